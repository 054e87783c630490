"""What each of WISE-Merge's departures from the paper buys: from `configs/zsre_wise_paper.yaml` to the tuned
`configs/zsre_wise.yaml`, one group of settings at a time, each step keeping all before it.

python -m wise_cl.benchmarks.ablation --num-edits 100 --chunks 1 2 --out benchmarks/results/ablation

Every step is a sweep variant of the paper's config (`sweep.py`: one `wise-cl fit` run per chunk, finished runs
skipped, interrupted ones resumed). Chunk 1 (requests 100-199) is the stream the tuned config was chosen on,
chunk 2 (200-299) one it never saw. `ablation.json` and `ablation.md`: each step's scores and what it changed
against the step before. Arguments after `--` go to every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from wise_cl.benchmarks.compare import SCORES, markdown_table
from wise_cl.benchmarks.sweep import run_names, run_variant

PAPER = Path("configs/zsre_wise_paper.yaml")
TUNED = Path("configs/zsre_wise.yaml")

# (what the step adds, the strategy settings it sets); all of them on PAPER's strategy make TUNED's
DEPARTURES: list[tuple[str, dict[str, Any]]] = [
    ("route decided on the prompt, kept while generating", {"keep_route": True, "route_on": "prompt"}),
    (
        "score as the paper's Eq. 3, sampled context, no weight bound",
        {
            "score_activation": False,
            "score_context": False,
            "threshold_rows": "plain",
            "context_style": "sampled",
            "weight_bound": 0.0,
        },
    ),
    (
        "fewer, larger steps and 3 context prefixes",
        {"lr": 8.0, "n_iter": 20, "early_stop_loss": 0.15, "num_context": 3},
    ),
    ("activation loss weight .1", {"act_loss_weight": 0.1}),
    ("margins 1 / 40 / 20", {"alpha": 1.0, "beta": 40.0, "gamma": 20.0}),
    ("5 irrelevant samples per edit", {"num_irrelevant": 5}),
    (
        "shards of 10 edits merged as they close, retrained after each merge",
        {
            "edits_per_shard": 10,
            "shards_per_merge": 1,
            "merge_density": 0.5,
            "prior_merge_weight": 2.0,
            "merge_consolidate_steps": 20,
        },
    ),
    ("shard routers", {"shard_routers": True}),
    ("calibration floor", {"calibration_texts": 100, "calibration_quantile": 0.9}),
    (
        "shared directions, subject and prompt negatives",
        {"shared_directions": 32, "subject_negatives": 10, "negative_choice": "nearest", "prompt_negatives": 10},
    ),
    ("shard consolidation with rehearsal", {"rehearse_shard": True, "consolidate_steps": 40}),
    ("act_ratio .9", {"act_ratio": 0.9}),
]

DELTAS = ("reliability", "generalization", "locality", "exact_match", "edit_seconds_median")


def ladder() -> list[tuple[str, str]]:
    """(step name, the sweep variant: every setting of this step and those before it), the paper's first."""
    steps, settings = [("the paper's config", "")], {}
    for name, changes in DEPARTURES:
        settings |= changes
        steps.append((f"+ {name}", " ".join(f"{key}={yaml_value(value)}" for key, value in settings.items())))
    return steps


def yaml_value(value: Any) -> str:
    """A setting as the command line spells it (`true`, not `True`)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def with_changes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `d_<score>`: its score minus the previous step's on the same chunk."""
    previous: dict[int, dict[str, Any]] = {}
    for row in rows:
        before = previous.get(row["chunk"])
        for key in DELTAS:
            ok = before is not None and row.get(key) is not None and before.get(key) is not None
            row[f"d_{key}"] = row[key] - before[key] if ok else None
        previous[row["chunk"]] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2], help="chunk c = requests c*T..c*T+T-1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    steps = ladder()
    names = run_names(args.out, [variant for _, variant in steps])
    rows = []
    for chunk in args.chunks:
        for step, variant in steps:
            scores = run_variant(PAPER, variant, names[variant], args.num_edits, chunk, args.out, extra)
            rows.append({"step": step, "run": names[variant], "chunk": chunk} | scores)
            print(json.dumps(rows[-1]), flush=True)
    rows = with_changes(rows)
    command = "python -m wise_cl.benchmarks.ablation " + shlex.join(sys.argv[1:])
    (args.out / "ablation.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    changes = {f"d_{key}": f"Δ {SCORES[key]}" for key in DELTAS}
    table = markdown_table(rows, {"step": "step", "chunk": "chunk", "run": "run"}, SCORES | changes)
    (args.out / "ablation.md").write_text(f"`{command}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
