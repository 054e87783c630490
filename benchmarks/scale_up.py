"""The paper's scale-up analysis: WISE-Merge against WISE-Retrieve as the stream grows, from one long run each.

python -m wise_cl.benchmarks.scale_up wise_merge=RUN wise_retrieve=RUN --at 100 500 1000 2000 3000 \
    --out benchmarks/results/scale_up

RUN is a `wise-cl fit` folder of a long stream with its forgetting curve (`configs/long_stream.yaml`). Editing the
first T requests does not depend on how many follow, so the curve's point after T edits is the final model of a
T-edit stream over the same requests, scored on the curve's sample of them (`scored` edits; the point after the
run's last edit is `metrics.json`, every edit). Writes `scale_up.json`, `scale_up.md` (one row per run and T) and
`scale_up.png` (Rel., Gen., Loc. against T, one line per run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from wise_cl.benchmarks.compare import markdown_table
from wise_cl.plotting import plot_curves
from wise_cl.provenance import code_version

METRICS = ("reliability", "generalization", "locality")
COLUMNS = {"T": "T", "scored": "edits scored", "reliability": "Rel.", "generalization": "Gen.", "locality": "Loc."}


def points_at(run: Path, at: list[int]) -> list[dict[str, Any]]:
    """The run's scores after each of `at` edits: its curve's points, and metrics.json after its last edit."""
    curve_file, metrics_file = run / "forgetting_curve.json", run / "metrics.json"
    if not curve_file.exists() or not metrics_file.exists():
        raise SystemExit(f"{run}: needs forgetting_curve.json and metrics.json (a finished `wise-cl fit` run)")
    metrics = json.loads(metrics_file.read_text())
    curve = {point["edits"]: point for point in json.loads(curve_file.read_text())}
    final = metrics.get("num_edits")
    rows = []
    for t in at:
        if t == final:
            rows.append({"T": t, "scored": final, **{m: metrics.get(m) for m in METRICS}})
        elif t in curve:
            rows.append({"T": t, "scored": curve[t].get("scored", t), **{m: curve[t].get(m) for m in METRICS}})
        else:
            raise SystemExit(f"{run}: no curve point after {t} edits (points: {sorted(curve)}; final: {final})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, e.g. wise_retrieve=runs/zsre_wise_retrieve/T3000")
    parser.add_argument("--at", type=int, nargs="+", default=[100, 500, 1000, 2000, 3000], help="stream lengths")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_up"))
    args = parser.parse_args()
    runs = dict(spec.split("=", 1) for spec in args.runs if "=" in spec)
    if len(runs) != len(args.runs):
        raise SystemExit(f"runs {args.runs}: each must be NAME=RUN_FOLDER")
    series = {name: points_at(Path(folder), args.at) for name, folder in runs.items()}
    command = "python -m wise_cl.benchmarks.scale_up " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "commit": code_version(), "runs": runs, "points": series}
    (args.out / "scale_up.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = [{"run": name, **row} for name, points in series.items() for row in points]
    table = markdown_table(rows, {"run": "run"}, COLUMNS)
    (args.out / "scale_up.md").write_text(f"`{command}`\n\n{table}")
    plot_curves(
        {name: [{"edits": p["T"], **p} for p in points] for name, points in series.items()}, args.out / "scale_up.png"
    )
    print(table)


if __name__ == "__main__":
    main()
