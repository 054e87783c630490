"""Run one config on disjoint edit streams it was never tuned on; per-stream, mean and worst scores.

python -m wise_cl.benchmarks.robustness --config configs/zsre_wise_retrieve.yaml \
    --out benchmarks/results/robustness/wise_retrieve

The default streams are 100 edits each: bundled ZsRE requests 200-299 through 900-999, two streams of
the ZsRE training-split sample (`zsre_train`, requests 0-99 and 100-199) and two CounterFact streams
(records 0-99 and 100-199); settings are chosen on ZsRE requests 0-199, which none of them touches.
`--single-edits N` adds N single-edit streams (T=1, each edited from the unedited model), half ZsRE
requests 1000 on, half CounterFact records 1000 on; they run first. `results.json` holds the streams of
one command, so give the single-edit streams and the others to the same command. Each stream is one
`wise-cl fit` run (see `compare.run_fit`: finished runs are skipped, interrupted ones resume), so the command can be
stopped and run again. Besides the final scores, each stream reports its forgetting curve's points
(`--curve-at 90` reads the scores after 90 edits, off any merge boundary) and the lowest reliability
from edit 20 on. Writes `results.json`, `results.md` and `curves.png` (every stream's curve) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wise_cl.benchmarks.compare import COST, LOWER_IS_BETTER, QUALITY, markdown_table, run_fit
from wise_cl.benchmarks.routing import routing_report, taken_by_other_memories
from wise_cl.plotting import plot_curves
from wise_cl.provenance import code_version

# with --routing
ROUTING = {
    "forced_reliability": "forced Rel",
    "routed_to_holder": "routed to holder",
    "to_older_memory": "to an older memory",
    "forced_generalization": "forced Gen",
    "rephrase_routed_to_holder": "reph. routed to holder",
}
WORST_IS_HIGHEST = LOWER_IS_BETTER | {"to_older_memory", "to_newer_memory"}


@dataclass(frozen=True)
class Stream:
    """Requests `start .. start + num_edits - 1` of a bundled data set or file."""

    data: str
    start: int
    num_edits: int

    @property
    def name(self) -> str:
        return f"{Path(self.data).stem}_{self.start}_T{self.num_edits}"

    @staticmethod
    def parse(spec: str) -> Stream:
        """`zsre:200:100` -> requests 200-299 of the bundled ZsRE set."""
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise SystemExit(f"--streams '{spec}': expected DATA:START:NUM_EDITS, e.g. zsre:200:100")
        return Stream(parts[0], int(parts[1]), int(parts[2]))


# interleaved, so a run stopped early has covered every source
DEFAULT_STREAMS = [
    Stream("zsre_train", 0, 100),
    Stream("counterfact", 0, 100),
    Stream("zsre", 200, 100),
    Stream("zsre_train", 100, 100),
    Stream("counterfact", 100, 100),
    *(Stream("zsre", start, 100) for start in range(300, 1000, 100)),
]


def single_edit_streams(count: int) -> list[Stream]:
    """`count` single-edit streams: ZsRE requests 1000 on and CounterFact records 1000 on, alternating."""
    return [Stream(("zsre", "counterfact")[i % 2], 1000 + i // 2, 1) for i in range(count)]


def routing_columns(folder: Path) -> dict[str, Any]:
    """From the run's routing report (made once, kept as routing.json): reliability and generalization when every
    edit is answered by the memory that holds it, the shares of edit prompts and rephrasings routed to that memory,
    and the share of edit prompts taken by a memory frozen before it."""
    path = folder / "routing.json"
    if not path.exists():
        report = routing_report(folder)
        path.write_text(json.dumps(report, indent=1) + "\n")
    report = json.loads(path.read_text())
    row, forced = report["act_ratio"][0], report.get("holding_memory_accuracy", {})
    return {
        "forced_reliability": forced.get("reliability"),
        "forced_generalization": forced.get("generalization"),
        "routed_to_holder": row.get("reliability_routed_to_holder"),
        "rephrase_routed_to_holder": row.get("generalization_routed_to_holder"),
        "locality_routed": row.get("locality_routed"),
        **taken_by_other_memories(row.get("reliability_per_request", [])),
    }


def stream_row(
    stream: Stream, metrics: dict[str, Any], curve: list[dict[str, float]], curve_at: list[int]
) -> dict[str, Any]:
    """One stream's final scores, the curve's scores after `curve_at` edits and its lowest reliability."""
    row: dict[str, Any] = {"stream": stream.name, "data": stream.data, "start": stream.start, "T": stream.num_edits}
    row |= {key: metrics.get(key) for key in QUALITY | COST}
    points = {point["edits"]: point for point in curve}
    for t in curve_at:
        if t in points:
            row |= {f"{key}@{t}": points[t].get(key) for key in ("reliability", "generalization", "locality")}
    late = [point["reliability"] for point in curve if point["edits"] >= 20]
    row["curve_min_reliability_from_20"] = min(late) if late else None
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, median and worst (lowest score; highest cost, perplexity or share of edits taken by another memory)
    of every numeric column over the streams; the median keeps one slow stream (a paused run) from setting the
    typical s/edit."""
    keys = [k for k in rows[0] if k not in ("stream", "data", "start", "T", "commit")]
    summary: dict[str, dict[str, float]] = {"mean": {}, "median": {}, "worst": {}}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
        if values:
            summary["mean"][key] = statistics.fmean(values)
            summary["median"][key] = statistics.median(values)
            summary["worst"][key] = max(values) if key in WORST_IS_HIGHEST else min(values)
    return summary


def markdown(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]], curve_at: list[int]) -> str:
    columns = QUALITY | COST
    at = (("reliability", "Rel"), ("locality", "Loc"))
    columns |= {f"{metric}@{t}": f"{head}@{t}" for t in curve_at for metric, head in at}
    if curve_at:
        columns["curve_min_reliability_from_20"] = "min curve Rel (>=20)"
    lines = rows + [{"stream": f"**{name}**", **values} for name, values in summary.items()]
    return markdown_table(lines, {"stream": "stream"}, columns | ROUTING)


def robustness(
    config: Path, streams: list[Stream], out: Path, extra: list[str], curve_at: list[int], routing: bool = False
) -> dict[str, Any]:
    """Run `config` on every stream; after each, write results.json, results.md and curves.png to `out`.
    With `routing`, each WISE stream of more than one edit also gets its routing report and the
    forced-to-holder columns. Each stream's row names the commit its run was made on."""
    groups: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    result: dict[str, Any] = {}
    for stream in streams:
        folder = out / "runs" / stream.name
        args = [f"--data.path={stream.data}", f"--data.start={stream.start}", f"--data.num_edits={stream.num_edits}"]
        provenance = folder / "provenance.json"
        fresh = not (folder / "metrics.json").exists()
        metrics = run_fit(config, folder, args + extra)
        if fresh:  # the commit that finished the run
            provenance.write_text(json.dumps({"commit": code_version(), "args": args + extra}, indent=1) + "\n")
        curve_file = folder / "forgetting_curve.json"
        curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
        row = stream_row(stream, metrics, curve, curve_at)
        row["commit"] = json.loads(provenance.read_text())["commit"] if provenance.exists() else "unknown"
        if routing and stream.num_edits > 1:
            row |= routing_columns(folder)
        groups.setdefault("single_edits" if stream.num_edits == 1 else "streams", []).append(row)
        if curve and stream.num_edits > 1:
            curves[stream.name] = curve
        print(json.dumps(row), flush=True)
        result = write_results(out, config, groups, curves, curve_at)
    return result


def write_results(
    out: Path, config: Path, groups: dict[str, list[dict[str, Any]]], curves: dict, curve_at: list[int]
) -> dict[str, Any]:
    """results.json, results.md and curves.png of the streams run so far."""
    command = "python -m wise_cl.benchmarks.robustness " + shlex.join(sys.argv[1:])
    result: dict[str, Any] = {"command": command, "commit": code_version(), "config": config.read_text()}
    text = f"`{command}`\n\nsummarised at commit {result['commit']} (each row names the commit of its run)\n"
    for group, rows in groups.items():
        summary = aggregate(rows)
        result[group] = {"rows": rows, **summary}
        shown_at = curve_at if group == "streams" else []
        text += f"\n### {group.replace('_', ' ')} ({len(rows)})\n\n" + markdown(rows, summary, shown_at)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(text)
    if curves:
        plot_curves(curves, out / "curves.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a wise-cl YAML")
    parser.add_argument("--streams", nargs="+", type=Stream.parse, help="DATA:START:NUM_EDITS (default: 12 streams)")
    parser.add_argument("--single-edits", type=int, default=0, help="single-edit streams to add (T=1)")
    parser.add_argument("--curve-at", type=int, nargs="*", default=[90], help="also report the curve after N edits")
    parser.add_argument("--routing", action="store_true", help="routing report per stream (WISE configs)")
    parser.add_argument("--out", type=Path, required=True)
    args, extra = parser.parse_known_args()
    # the cheap single-edit streams first; a stream named twice runs once
    streams = list(dict.fromkeys(single_edit_streams(args.single_edits) + (args.streams or DEFAULT_STREAMS)))
    args.out.mkdir(parents=True, exist_ok=True)
    robustness(args.config, streams, args.out, [a for a in extra if a != "--"], args.curve_at, args.routing)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
