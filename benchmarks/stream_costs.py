"""What a stream costs as it grows: seconds per edit (editing plus the memory callbacks) and checkpoint writes.

python -m wise_cl.benchmarks.stream_costs runs/zsre_wise_retrieve/version_0 --window 100 \
    --out benchmarks/results/stream_costs/zsre_retrieve_T1000

Reads the TensorBoard scalars a `wise-cl fit` run logs at every edit (`s_per_edit`, `memory_seconds/*`,
`checkpoint/seconds`, `checkpoint/megabytes`, `peak_rss_megabytes`) and reports, per run, the median total
seconds per edit, the mean over the first and the last `--window` edits and their ratio (flat costs: near 1),
the largest and median checkpoint write and `last.ckpt` size, and the process's peak resident memory.
Writes `costs.json`, `costs.md` and `costs.png` (total seconds per edit along the stream, and the checkpoint's
size).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from wise_cl.benchmarks.compare import markdown_table
from wise_cl.plotting import plot_stream_costs
from wise_cl.provenance import code_version


def event_files(run: Path) -> list[Path]:
    """The run's TensorBoard files in the order they were written, from their names
    (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`): a clone's or a copy's modification times say nothing."""

    def written(file: Path) -> tuple[int, int]:
        parts = file.name.split(".")
        return int(parts[3]), int(parts[-1])

    return sorted(run.glob("events.out.tfevents.*"), key=written)


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """Every scalar the run's TensorBoard files hold, by tag and step (a resumed run's later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = event_files(run)
    if not files:
        raise SystemExit(f"{run}: no TensorBoard events file (is it a `wise-cl fit` run folder?)")
    scalars: dict[str, dict[int, float]] = {}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update((e.step, e.value) for e in events.Scalars(tag))
    return scalars


def per_edit_seconds(scalars: dict[str, dict[int, float]]) -> list[float]:
    """Per logged step, editing plus every memory callback's seconds, in step order."""
    if "s_per_edit" not in scalars:
        raise SystemExit("no `s_per_edit` scalar: not a `wise-cl fit` run")
    memory = [values for tag, values in scalars.items() if tag.startswith("memory_seconds/")]
    steps = sorted(scalars["s_per_edit"])
    return [scalars["s_per_edit"][s] + sum(values.get(s, 0.0) for values in memory) for s in steps]


def costs(run: Path, window: int) -> dict:
    """The cost figures of one run (see the module docstring)."""
    scalars = read_scalars(run)
    seconds = per_edit_seconds(scalars)
    first, last = seconds[:window], seconds[-window:]
    result = {
        "run": str(run),
        "edits": len(seconds),
        "window": window,
        "seconds_per_edit_median": statistics.median(seconds),
        "first_window_mean": statistics.fmean(first),
        "last_window_mean": statistics.fmean(last),
        "last_over_first": statistics.fmean(last) / statistics.fmean(first),
        "seconds_per_edit": seconds,
    }
    for name in ("seconds", "megabytes"):
        by_step = scalars.get(f"checkpoint/{name}", {})
        result[f"checkpoint_{name}"] = [by_step[step] for step in sorted(by_step)]
        if by_step:
            result[f"checkpoint_{name}_max"] = max(by_step.values())
            result[f"checkpoint_{name}_median"] = statistics.median(by_step.values())
    if "peak_rss_megabytes" in scalars:
        result["peak_rss_megabytes"] = max(scalars["peak_rss_megabytes"].values())
    return result


COLUMNS = {
    "edits": "edits",
    "seconds_per_edit_median": "median s/edit",
    "first_window_mean": "first window s/edit",
    "last_window_mean": "last window s/edit",
    "last_over_first": "last / first",
    "checkpoint_seconds_max": "ckpt write max (s)",
    "checkpoint_megabytes_max": "last.ckpt max (MiB)",
    "peak_rss_megabytes": "peak RSS (MiB)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="`wise-cl fit` run folders (with TensorBoard events)")
    parser.add_argument("--window", type=int, default=100, help="edits at the start and at the end compared")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_costs"))
    args = parser.parse_args()
    if args.window < 1:
        raise SystemExit(f"--window {args.window}: at least 1")
    results = [costs(run, args.window) for run in args.runs]
    command = "python -m wise_cl.benchmarks.stream_costs " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "commit": code_version(), "runs": results}
    (args.out / "costs.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown_table(results, {"run": "run"}, COLUMNS)
    (args.out / "costs.md").write_text(f"`{command}`\n\n{table}")
    # each run by its folder and parent (`grace/T1000-chunk0`): a `compare`'s runs share their folder names
    series = {"/".join(Path(r["run"]).parts[-2:]): (r["seconds_per_edit"], r["checkpoint_megabytes"]) for r in results}
    plot_stream_costs(series, args.out / "costs.png")
    print(table)


if __name__ == "__main__":
    main()
