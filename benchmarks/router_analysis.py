"""The paper's router analyses (WISE §3.3) on finished WISE runs: how the edit prompts, their rephrasings and
unrelated prompts score against the threshold of the memory that would answer them, and what the router is
worth next to sending every sequence to a side memory or to the main memory.

python -m wise_cl.benchmarks.router_analysis RUN [RUN ...] --out benchmarks/results/router_analysis

RUN is a `wise-cl fit` run folder of WISE (config.yaml, checkpoints/last.ckpt), e.g. the T=1, 10 and 100 runs
of a `compare`. Each run is scored three ways on its own requests: `routed` (its thresholds), `side` (no
threshold: every sequence to its best-scoring side memory, or with WISE-Merge's shard routers to the memory its
best router answers with) and `main` (every sequence to the main memory, the unedited model). Per prompt, the
routing memory's activation score as a share of that memory's threshold (above 1: routed) is kept and drawn as
one histogram per run and set. Writes router_analysis.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from wise_cl.benchmarks.routing import accuracy, load_run, memory_scores, request_sets, restored_serving
from wise_cl.plotting import plot_histograms
from wise_cl.provenance import code_version
from wise_cl.side_memory import MAIN, route

MODES = ("routed", "side", "main")
OPEN_GATE = 1e-12  # positive, so that scores over it rank as the scores do (`route` with shard routers)


def score_ratios(scores: torch.Tensor, thresholds: torch.Tensor, answers: list[int] | None) -> list[float]:
    """Per prompt, the routing memory's score over its threshold ([memories, prompts] scores): the route's margin.
    The routing memory is the highest-scoring one, or with `answers` (shard routers) the one that passes its
    threshold by the largest factor, as `route` decides."""
    if answers is not None:
        return (scores / thresholds[:, None].clamp(min=OPEN_GATE)).max(0).values.tolist()
    best, index = scores.max(0)
    return (best / thresholds[index].clamp(min=OPEN_GATE)).tolist()


def analyse_run(folder: Path) -> dict[str, Any]:
    """One run's scores under each routing mode and the score ratios of each set's prompts."""
    strategy, requests, reference = load_run(folder)
    sets = request_sets(requests)
    adapter = strategy.adapter
    taus, thresholds, answers = list(adapter.taus), torch.tensor(adapter.thresholds), adapter.answers
    memory = {name: memory_scores(strategy, s.prompts, s.answers) for name, s in sets.items()}
    ratios = {name: score_ratios(scores, thresholds, answers) for name, scores in memory.items()}
    references = {name: reference if name == "locality" else None for name in sets}
    # side: a threshold every score passes (a memory that only answers, threshold inf, still routes nothing)
    side = [t if t == math.inf else OPEN_GATE for t in thresholds.tolist()]
    gates = {"routed": thresholds.tolist(), "side": side, "main": [math.inf] * len(taus)}
    scores: dict[str, dict[str, float]] = {}
    with restored_serving(adapter):
        for mode in MODES:
            adapter.serve(taus, gates[mode], answers)
            scores[mode] = {
                name: float(accuracy(strategy, s.prompts, s.answers, references[name]).nanmean())
                for name, s in sets.items()
            }
    return {
        "run": str(folder),
        "num_edits": len(requests),
        "memories": len(taus),
        "scores": scores,
        "routed_share": {
            name: float((route(values, thresholds, answers) != MAIN).float().mean()) for name, values in memory.items()
        },
        "median_score_ratio": {name: statistics.median(values) for name, values in ratios.items()},
        "score_ratios": ratios,
    }


def label(result: dict[str, Any]) -> str:
    """A run's short name in tables and plots: its folder and parent (`wise/T100-chunk0`)."""
    path = Path(result["run"])
    return f"{path.parent.name}/{path.name}"


def markdown(results: list[dict[str, Any]], command: str) -> str:
    """Two tables: scores per routing mode, and the share of each set's prompts over the threshold."""
    sets = list(results[0]["scores"]["routed"])
    lines = [f"`{command}`", "", "| run | T | memories | mode | " + " | ".join(sets) + " |"]
    lines.append("|---" * (4 + len(sets)) + "|")
    for r in results:
        for mode in MODES:
            values = " | ".join(f"{r['scores'][mode][name]:.3f}" for name in sets)
            lines.append(f"| {label(r)} | {r['num_edits']} | {r['memories']} | {mode} | {values} |")
    lines += ["", "Share of prompts whose best memory scores over its threshold (median score / threshold):", ""]
    lines += ["| run | " + " | ".join(sets) + " |", "|---" * (1 + len(sets)) + "|"]
    for r in results:
        cells = (f"{r['routed_share'][n]:.2f} ({r['median_score_ratio'][n]:.2f})" for n in sets)
        lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="`wise-cl fit` run folders of WISE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_analysis"))
    args = parser.parse_args()
    command = "python -m wise_cl.benchmarks.router_analysis " + shlex.join(sys.argv[1:])
    results = []
    for folder in args.runs:
        results.append(analyse_run(folder))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "score_ratios"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_analysis.json").write_text(
        json.dumps({"command": command, "commit": code_version(), "runs": results}, indent=1) + "\n"
    )
    (args.out / "router_analysis.md").write_text(markdown(results, command))
    panels = {label(r): r["score_ratios"] for r in results}
    plot_histograms(panels, args.out / "router_analysis.png", "best memory's score / its threshold", line_at=1.0)


if __name__ == "__main__":
    main()
