"""A tuning budget for the baselines like WISE's: each baseline's main settings (layer, lr, steps, its own
regulariser) changed one at a time around its config, on the ZsRE dev stream WISE was tuned on (requests
100-199, T=100); the best is the highest mean of reliability, generalization and locality.

python -m wise_cl.benchmarks.tune_baselines --out benchmarks/results/baseline_tuning
python -m wise_cl.benchmarks.tune_baselines --configs configs/zsre_grace.yaml --num-edits 10   # one, shorter

Every setting is a sweep variant (`sweep.py`: one `wise-cl fit` run per setting under `<out>/<strategy>/`,
finished runs skipped, interrupted ones resumed; the config as it is runs too). `tuning.json` and `tuning.md`:
every run's scores and each baseline's best setting. Nothing changes a config: freezing the best is a commit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from wise_cl.benchmarks.compare import SCORES, markdown_table, strategy_name
from wise_cl.benchmarks.sweep import run_names, run_variant


def layers(*indices: int) -> list[str]:
    """SmolLM2's FFN down-projections at these depths (of its 30 layers)."""
    return [f"model.layers.{i}.mlp.down_proj" for i in indices]


# per config, the values tried for each setting (each alone, the config's other settings unchanged)
GRIDS: dict[str, dict[str, list[Any]]] = {
    "configs/zsre_ft.yaml": {
        "layer": layers(17, 20, 27),
        "lr": [2.0, 16.0],
        "n_iter": [20, 70],
        "kl_weight": [0.3, 3.0],
    },
    "configs/zsre_ft_paper.yaml": {"layer": layers(17, 23, 27), "lr": [1e-4, 2e-3], "n_iter": [10, 50]},
    "configs/zsre_ewc.yaml": {
        "layer": layers(17, 20, 27),
        "lr": [2.0, 16.0],
        "n_iter": [20, 70],
        "ewc_lambda": [1e3, 1e5],
    },
    "configs/zsre_ewc_paper.yaml": {"layer": layers(17, 23, 27), "lr": [1e-4, 2e-3], "ewc_lambda": [1e3, 1e5]},
    # GRACE's epsilon is a distance in the layer's input space; 1.0 takes in few rephrasings (ZsRE T=100 Gen. .18)
    "configs/zsre_grace.yaml": {"layer": layers(17, 20, 27), "epsilon": [3.0, 6.0, 10.0], "n_iter": [20, 70]},
    "configs/zsre_defer.yaml": {
        "layer": layers(17, 20, 27),
        "lr": [2.0, 16.0],
        "classifier_lr": [1.0, 20.0],
        "classifier_steps": [50, 200],
    },
}
QUALITY = ("reliability", "generalization", "locality")


def variants(grid: dict[str, list[Any]]) -> list[str]:
    """The config as it is (`""`), then one `key=value` variant per value tried."""
    return ["", *(f"{key}={value}" for key, values in grid.items() for value in values)]


def quality(row: dict[str, Any]) -> float | None:
    """Mean of reliability, generalization and locality (None when one is missing)."""
    values = [row.get(key) for key in QUALITY]
    return None if None in values else statistics.fmean(values)


def tune(
    config: Path, grid: dict[str, list[Any]], num_edits: int, chunk: int, out: Path, extra: list[str]
) -> list[dict]:
    """Run every variant of `config` on one chunk; a row per variant, the best (highest quality) marked."""
    folder = out / strategy_name(config)
    folder.mkdir(parents=True, exist_ok=True)
    tried = variants(grid)
    names = run_names(folder, tried)
    rows = []
    for variant in tried:
        scores = run_variant(config, variant, names[variant], num_edits, chunk, folder, extra)
        row = {"strategy": strategy_name(config), "variant": variant or "(as is)", "run": names[variant]} | scores
        rows.append(row | {"quality": quality(scores)})
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda row: -1.0 if row["quality"] is None else row["quality"])
    for row in rows:
        row["best"] = row is best
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+", default=[Path(c) for c in GRIDS])
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=1, help="requests chunk*T .. chunk*T+T-1 (1: WISE's dev stream)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baseline_tuning"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    unknown = [str(c) for c in args.configs if c.as_posix() not in GRIDS]
    if unknown:
        parser.error(f"no tuning grid for {', '.join(unknown)}; grids: {', '.join(GRIDS)}")
    rows = []
    for config in args.configs:
        rows += tune(config, GRIDS[config.as_posix()], args.num_edits, args.chunk, args.out, extra)
    command = "python -m wise_cl.benchmarks.tune_baselines " + shlex.join(sys.argv[1:])
    (args.out / "tuning.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    shown = [row | {"variant": f"`{row['variant']}`" + (" **best**" if row["best"] else "")} for row in rows]
    lead = {"strategy": "strategy", "variant": "variant", "run": "run"}
    table = markdown_table(shown, lead, {"quality": "mean of Rel., Gen., Loc."} | SCORES)
    (args.out / "tuning.md").write_text(f"`{command}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
