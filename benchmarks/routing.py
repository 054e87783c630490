"""Where a finished WISE run's answers come from: routing rates, each memory's own accuracy on the
edits it holds, and the scores under other routing thresholds, from the run's folder.

python -m wise_cl.benchmarks.routing benchmarks/results/zsre_compare/tensorboard/wise/T100-chunk0 \
    --act-ratio 0.88 1.0 1.2

`act_ratio` only sets the thresholds (act_ratio x the smallest edit score a memory holds): it does
not change what editing trained, so the run's final side memories are scored once per value.
Writes `routing.json` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from wise_cl import WISE, read_requests
from wise_cl.editing_forward import CachedForward
from wise_cl.evaluation import predict_answers, scored_prompts
from wise_cl.metrics import per_request_score
from wise_cl.rows import teacher_forced_batch
from wise_cl.serving import wise_run
from wise_cl.side_memory import MAIN, SideMemoryLinear, route


def load_run(folder: Path) -> tuple[WISE, list, list[Tensor]]:
    """The run's WISE strategy with its final side memories, its requests and locality reference."""
    try:
        strategy, config, state = wise_run(folder)
    except ValueError as error:
        raise SystemExit(f"{error}; pass the folder of a `wise-cl fit` run of WISE") from None
    data = config["data"]
    requests = read_requests(data["path"], data.get("layout"), data["num_edits"], data.get("start") or 0)
    return strategy, requests, state["locality_reference"]


class PromptSet(NamedTuple):
    """Prompts scored together, their answers and, per prompt, the index of the request it comes from."""

    prompts: list[str]
    answers: list[str]
    owners: list[int]


def request_sets(requests: list) -> dict[str, PromptSet]:
    """The prompts a run is scored on, as the harness scores them (`scored_prompts`)."""
    sets = {}
    for name, prompts in scored_prompts(requests).items():
        owners, texts, answers = zip(*prompts, strict=True)
        sets[name] = PromptSet(list(texts), list(answers), list(owners))
    return sets


@torch.no_grad()
def memory_scores(strategy: WISE, prompts: list[str], answers: list[str], batch: int = 16) -> Tensor:
    """Activation score of each prompt + answer on each serving memory: [memories, prompts]."""
    adapter, scores = strategy.adapter, []
    for start in range(0, len(prompts), batch):
        rows = teacher_forced_batch(strategy.tokenizer, prompts[start : start + batch], answers[start : start + batch])
        rows = rows.to(strategy.model.device)
        activation = CachedForward(strategy.model, adapter, rows, strategy.layer).full_activation()
        adapter.token_mask = strategy.score_mask(rows)  # the tokens routing scores (`route_on`)
        scores.append(adapter.scores(activation).cpu())
    return torch.cat(scores, 1)


def accuracy(strategy: WISE, prompts: list[str], answers: list[str], reference: list[Tensor] | None = None) -> Tensor:
    """Per request, the share of answer tokens predicted right (or as the unedited model did); NaN without any."""
    out = predict_answers(strategy.model, strategy.tokenizer, prompts, answers)
    target = torch.cat(reference).to(out.preds.device) if reference is not None else out.labels
    return per_request_score((out.preds == target).double(), out.rows, len(prompts)).cpu()


def holding_memory(strategy: WISE, num_requests: int) -> Tensor | None:
    """Per request, the index of the serving memory that holds it: the frozen memories' blocks, then the
    current memory's closed part and its open shard (None if the stream was not edited one block at a time)."""
    memory = strategy.memory
    open_shard = len(memory.shard_edits)
    blocks = [strategy.edits_per_shard * strategy.shards_per_merge] * len(memory.frozen)
    if memory.routers:  # each closed shard routes its own edits (to the merged memory)
        blocks += [strategy.edits_per_shard] * len(memory.routers) + ([open_shard] if open_shard else [])
    else:
        blocks += [count for count in (len(memory.edits) - open_shard, open_shard) if count]
    if sum(blocks) != num_requests:
        return None
    return torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks, dtype=torch.long))


@contextmanager
def restored_serving(adapter: SideMemoryLinear) -> Iterator[None]:
    """Serve other memories or thresholds inside the block; the adapter's own afterwards."""
    taus, thresholds, answers = list(adapter.taus), list(adapter.thresholds), adapter.answers
    try:
        yield
    finally:
        adapter.serve(taus, thresholds, answers)


def forced_accuracy(strategy: WISE, prompts: PromptSet, holder: Tensor) -> float:
    """Mean accuracy when every prompt is answered by the memory that holds its request (perfect routing)."""
    adapter = strategy.adapter
    correct = torch.zeros(len(holder), dtype=torch.double)
    taus, answers = list(adapter.taus), adapter.answers or range(len(adapter.taus))
    with restored_serving(adapter):
        for m, answer in enumerate(answers):
            held = (holder == m).nonzero().squeeze(1).tolist()
            if held:
                adapter.serve([taus[answer]], [-float("inf")])
                pairs = [prompts.prompts[i] for i in held], [prompts.answers[i] for i in held]
                correct[held] = accuracy(strategy, *pairs)
    return float(correct.mean())


def over(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Per memory, the share of prompts scoring above its threshold: [memories, prompts] -> [memories]."""
    return (scores > thresholds[:, None]).float().mean(1)


def per_request(scores: Tensor, thresholds: Tensor, routes: Tensor, holder: Tensor | None) -> list[dict[str, Any]]:
    """Per prompt of a set (one per request but for the rephrasings): the memory it is routed to (-1: main),
    and the holder's and best other memory's score and threshold."""
    rows = []
    for i in range(scores.shape[1]):
        row: dict[str, Any] = {"routed": int(routes[i])}
        column = scores[:, i].clone()
        if holder is not None:
            h = int(holder[i])
            row |= {"holder": h, "holder_score": round(float(column[h]), 2)}
            row["holder_threshold"] = round(float(thresholds[h]), 2)
            column[h] = -float("inf")
        if len(column) and column.max() > -float("inf"):
            other = int(column.argmax())
            row |= {"other": other, "other_score": round(float(column[other]), 2)}
            row["other_threshold"] = round(float(thresholds[other]), 2)
        rows.append(row)
    return rows


def taken_by_other_memories(rows: list[dict[str, Any]]) -> dict[str, float]:
    """From `per_request` rows: the shares of requests routed to a memory other than the one holding them,
    frozen before it (`older`) or after it (`newer`); memories are numbered in the order they were made."""
    taken = [row for row in rows if "holder" in row and row["routed"] not in (MAIN, row["holder"])]
    count = max(len(rows), 1)
    return {
        "to_older_memory": sum(row["routed"] < row["holder"] for row in taken) / count,
        "to_newer_memory": sum(row["routed"] > row["holder"] for row in taken) / count,
    }


def routing_report(folder: Path, act_ratios: list[float] | None = None) -> dict[str, Any]:
    """The routing report of a finished run under each act_ratio (default: the run's own)."""
    strategy, requests, reference = load_run(folder)
    sets = request_sets(requests)
    scores = {name: memory_scores(strategy, s.prompts, s.answers) for name, s in sets.items()}
    holder = holding_memory(strategy, len(requests))
    # per set, the memory holding each prompt's request
    holders = {name: holder[s.owners] for name, s in sets.items()} if holder is not None else {}
    report: dict[str, Any] = {"run": str(folder), "memories": len(strategy.adapter.taus)}
    if holder is not None:
        report["holding_memory_accuracy"] = {
            name: forced_accuracy(strategy, s, holders[name]) for name, s in sets.items() if name != "locality"
        }
    rows = []
    for ratio in act_ratios or [strategy.act_ratio]:
        strategy.act_ratio = ratio
        strategy.publish()
        thresholds = torch.tensor(strategy.adapter.thresholds)
        row: dict[str, Any] = {"act_ratio": ratio, "thresholds": [round(t, 2) for t in thresholds.tolist()]}
        for name, prompts in sets.items():
            target = reference if name == "locality" else None
            row[name] = float(accuracy(strategy, prompts.prompts, prompts.answers, target).nanmean())
            index = route(scores[name], thresholds, strategy.adapter.answers)
            routed = index != MAIN
            row[f"{name}_routed"] = float(routed.float().mean())
            # whether or not another memory scores higher
            row[f"{name}_over_threshold_per_memory"] = [round(float(x), 3) for x in over(scores[name], thresholds)]
            row[f"{name}_per_request"] = per_request(scores[name], thresholds, index, holders.get(name))
            if holder is not None and name != "locality":
                held = holders[name]
                answering = held if strategy.adapter.answers is None else torch.tensor(strategy.adapter.answers)[held]
                row[f"{name}_routed_to_holder"] = float((index == answering).float().mean())
                shares = taken_by_other_memories(row[f"{name}_per_request"])
                row |= {f"{name}_{key}": value for key, value in shares.items()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if isinstance(v, str | float)}), flush=True)
    return report | {"act_ratio": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `wise-cl fit` run folder (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--act-ratio", type=float, nargs="+", help="thresholds to try (default: the run's act_ratio)")
    args = parser.parse_args()
    report = routing_report(args.run, args.act_ratio)
    report["command"] = "python -m wise_cl.benchmarks.routing " + shlex.join(sys.argv[1:])
    (args.run / "routing.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
