"""Inference cost of edited WISE models against the unedited one: teacher-forced scoring and greedy
generation of the same prompts, timed in one process.

python -m wise_cl.benchmarks.inference_overhead --runs runs/zsre_wise/version_0 runs/zsre_wise_retrieve/version_0 \
    --synthetic 10 100 300 --out benchmarks/results/inference_overhead

Each `--runs` folder (or its `last.ckpt`) of a WISE run is rebuilt with its side memories as last saved
(`serving.wise_run`); its unedited model is the same model with the adapter detached. `--synthetic N`
attaches N random side memories of the layer's shape that no prompt passes (the cost of scoring every
memory without the cost of answering from one). The prompts are the first `--prompts` ZsRE locality
prompts: with their answers for teacher-forced scoring, alone for greedy generation (`--new-tokens`).
Each timing is the median of `--repeats` passes after a warm-up pass; the unedited model is timed next
to every edited one, so each ratio compares passes made minutes apart at most. `--route-sketch K M` routes
every edited model in two stages (`SideMemoryLinear.use_sketch`: a K-dimensional sketch, then M candidates
scored exactly); each run's row then also gives the share of its edit and locality prompts that the sketch
routes as exact scoring does (`route_agreement`). Writes `results.json` and `results.md` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.benchmarks.routing import load_run
from wise_cl.evaluation import greedy_tokens, predict_answers
from wise_cl.models import load_model
from wise_cl.provenance import code_version
from wise_cl.records import read_requests
from wise_cl.side_memory import SideMemoryLinear, attach_side_memory, detach_side_memory

DEFAULT_LAYER = "model.layers.25.mlp.down_proj"


def median_seconds(work: Callable[[], Any], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `work`, after one call that is not timed."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def timings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    new_tokens: int,
    repeats: int,
) -> dict[str, float]:
    """Seconds to score the prompts' answers teacher-forced and to generate `new_tokens` after each prompt."""
    return {
        "scoring": median_seconds(lambda: predict_answers(model, tokenizer, prompts, answers), repeats),
        "generation": median_seconds(lambda: greedy_tokens(model, tokenizer, prompts, new_tokens), repeats),
    }


@torch.no_grad()
def routes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: SideMemoryLinear, prompts: list[str]
) -> Tensor:
    """The memory each prompt is routed to (`MAIN`: none), 16 prompts a pass."""
    found = []
    for start in range(0, len(prompts), 16):
        model(**tokenizer(prompts[start : start + 16], return_tensors="pt", padding=True).to(model.device))
        found.append(adapter.route.cpu())
    return torch.cat(found)


def compared(edited: dict[str, float], unedited: dict[str, float]) -> dict[str, float]:
    """Both timings and their ratios (edited over unedited)."""
    row = {f"{name}_seconds": seconds for name, seconds in edited.items()}
    row |= {f"unedited_{name}_seconds": seconds for name, seconds in unedited.items()}
    return row | {f"{name}_ratio": edited[name] / unedited[name] for name in edited}


def inference_overhead(
    runs: list[Path],
    synthetic: list[int],
    model_name: str,
    layer: str,
    num_prompts: int,
    new_tokens: int,
    repeats: int,
    sketch: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """One row per run and per synthetic memory count: what was timed, its timings and ratios (routing with
    `sketch`: dimensions and candidates, see `SideMemoryLinear.use_sketch`)."""
    requests = read_requests("zsre", limit=num_prompts)
    prompts, answers = [r.locality_prompt for r in requests], [r.locality_answer for r in requests]
    rows = []
    for run in runs:
        strategy, run_requests, _ = load_run(run)
        model, tokenizer = strategy.model, strategy.tokenizer
        row = {"run": str(run), "edits": len(run_requests), "side_memories": len(strategy.adapter.taus)}
        if sketch[0]:
            routed = [r.prompt for r in run_requests] + [r.locality_prompt for r in run_requests]
            exact = routes(model, tokenizer, strategy.adapter, routed)
            strategy.adapter.use_sketch(*sketch)
            agree = routes(model, tokenizer, strategy.adapter, routed) == exact
            row["route_agreement"] = float(agree.float().mean())
        edited = timings(model, tokenizer, prompts, answers, new_tokens, repeats)
        strategy.detach()
        unedited = timings(model, tokenizer, prompts, answers, new_tokens, repeats)
        rows.append(row | compared(edited, unedited))
        print(json.dumps(rows[-1]), flush=True)
    if synthetic:
        model, tokenizer = load_model(model_name)
        generator = torch.Generator().manual_seed(0)
        for count in synthetic:
            unedited = timings(model, tokenizer, prompts, answers, new_tokens, repeats)
            adapter = attach_side_memory(model, layer)
            adapter.use_sketch(*sketch)
            shape = adapter.weight.shape
            taus = [torch.randn(shape, generator=generator).to(adapter.weight) * 1e-3 for _ in range(count)]
            adapter.serve(taus, [float("inf")] * count)  # scored on every sequence, never answering
            edited = timings(model, tokenizer, prompts, answers, new_tokens, repeats)
            detach_side_memory(model, layer)
            rows.append(
                {"run": f"synthetic:{count}", "edits": None, "side_memories": count} | compared(edited, unedited)
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | edits | side memories | scoring s | unedited | ratio | generation s | unedited | ratio"
        " | route agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["run"], "-" if r["edits"] is None else r["edits"], r["side_memories"]]
        for name in ("scoring", "generation"):
            cells += [
                f"{r[f'{name}_seconds']:.2f}",
                f"{r[f'unedited_{name}_seconds']:.2f}",
                f"{r[f'{name}_ratio']:.3f}",
            ]
        cells.append(f"{r['route_agreement']:.3f}" if "route_agreement" in r else "-")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="WISE run folders or their last.ckpt")
    parser.add_argument("--synthetic", type=int, nargs="*", default=[], help="counts of random, never-routed memories")
    parser.add_argument("--model", default="smollm2-135m", help="model of the synthetic rows")
    parser.add_argument("--layer", default=DEFAULT_LAYER, help="layer of the synthetic memories")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--route-sketch", type=int, nargs=2, default=[0, 1], metavar=("DIMS", "CANDIDATES"), help="two-stage routing"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.runs and not args.synthetic:
        parser.error("give --runs, --synthetic or both")
    rows = inference_overhead(
        args.runs,
        args.synthetic,
        args.model,
        args.layer,
        args.prompts,
        args.new_tokens,
        args.repeats,
        args.route_sketch,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m wise_cl.benchmarks.inference_overhead " + shlex.join(sys.argv[1:])
    result = {"command": command, "commit": code_version(), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(f"`{command}`\n\nat commit {result['commit']}\n\n" + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
