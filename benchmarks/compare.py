"""Run editing strategies on the same stream at several T and tabulate reliability, generalization,
locality, the free-generation scores and seconds per edit (markdown + JSON), with one plot of the
forgetting curves.

python -m wise_cl.benchmarks.compare --configs configs/zsre_wise.yaml configs/zsre_wise_retrieve.yaml \
    --num-edits 1 10 100 --chunks 10 3 1 --out benchmarks/results/zsre_wise

T = 1 and 10 average `chunks` consecutive chunks of T requests, each edited from the unedited model
(reset between chunks, as in the paper); a single chunk is one stream of T edits. Every chunk is a
`wise-cl fit` run (its own process) logged to TensorBoard under `<out>/tensorboard/<strategy>/T<T>-chunk<k>`. Arguments
after `--` go to every run (`-- --model.strategy.init_args.alpha=2`). A rerun skips finished chunks
and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from wise_cl.plotting import plot_curves
from wise_cl.provenance import code_version

QUALITY = (
    "reliability",
    "generalization",
    "locality",
    "exact_match",
    "answer_match",
    "rephrase_answer_match",
    "generation_locality",
)
QUALITY_HEADS = ("Rel.", "Gen.", "Loc.", "EM", "AM", "reph. AM", "gen. Loc.")  # table columns of QUALITY
SCORES = (*QUALITY, "edit_seconds_median")
COLUMNS = (*QUALITY_HEADS, "s/edit")


def strategy_name(config: Path) -> str:
    """`configs/zsre_wise_retrieve.yaml` -> `wise_retrieve`."""
    return config.stem.split("_", 1)[-1]


def run_fit(config: Path, folder: Path, args: list[str]) -> dict[str, Any]:
    """One `wise-cl fit` run of `config` with `args`, logged to `folder`; its metrics.json as a dict.

    A finished run (metrics.json present) is not run again; an interrupted one resumes from its checkpoint.
    """
    metrics = folder / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    args = [
        "fit",
        f"--config={config}",
        *args,
        f"--trainer.logger.init_args.save_dir={folder.parent.parent}",
        f"--trainer.logger.init_args.name={folder.parent.name}",
        f"--trainer.logger.init_args.version={folder.name}",
    ]
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if checkpoint.exists():
        args.append(f"--ckpt_path={checkpoint}")
    # a fresh process per run: many runs in one process slow each other down (seen: 4x per step)
    subprocess.run([sys.executable, "-m", "wise_cl.cli", *args], check=True)
    return json.loads(metrics.read_text())


def run_chunk(config: Path, name: str, num_edits: int, chunk: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One `wise-cl fit` run over requests `chunk * T .. chunk * T + T - 1`; its metrics.json as a dict."""
    folder = out / "tensorboard" / name / f"T{num_edits}-chunk{chunk}"
    return run_fit(config, folder, [f"--data.num_edits={num_edits}", f"--data.start={chunk * num_edits}", *extra])


def summarise(name: str, num_edits: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each score over the chunks of one (strategy, T)."""
    commits = sorted({r.get("commit", "unknown")[:7] for r in runs})
    row: dict[str, Any] = {"strategy": name, "T": num_edits, "chunks": len(runs), "commit": ",".join(commits)}
    for key in SCORES:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
    return row


def score_cells(row: dict[str, Any]) -> list[str]:
    """The row's SCORES as table cells (`-` where missing)."""
    return ["-" if row.get(k) is None else f"{row[k]:.3f}" for k in SCORES]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = ("strategy", "T", "chunks", "commit", *COLUMNS)
    header = "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|\n"
    cells = [[r["strategy"], r["T"], r["chunks"], r.get("commit", "-"), *score_cells(r)] for r in rows]
    return header + "".join("| " + " | ".join(map(str, c)) + " |\n" for c in cells)


def compare(
    configs: list[Path], num_edits: list[int], chunks: list[int], out: Path, extra: list[str]
) -> list[dict[str, Any]]:
    """Run every config at every T; write results.json, results.md and forgetting_curves.png to `out`."""
    rows, runs, curves = [], [], {}
    for config in configs:
        name = strategy_name(config)
        for t, count in zip(num_edits, chunks, strict=True):
            results = [run_chunk(config, name, t, k, out, extra) for k in range(count)]
            runs += [{"strategy": name, "T": t, "chunk": k, **r} for k, r in enumerate(results)]
            rows.append(summarise(name, t, results))
            print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
        curve = out / "tensorboard" / name / f"T{max(num_edits)}-chunk0" / "forgetting_curve.json"
        if curve.exists():
            curves[name] = json.loads(curve.read_text())
    command = "python -m wise_cl.benchmarks.compare " + shlex.join(sys.argv[1:])
    result = {"command": command, "commit": code_version(), "rows": rows, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    note = f"summarised at commit {result['commit']}; each row names the commits of its runs (first 7 digits)"
    (out / "results.md").write_text(f"`{command}`\n\n{note}\n\n" + markdown_table(rows))
    if curves:
        plot_curves(curves, out / "forgetting_curves.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+", required=True, help="one wise-cl YAML per strategy")
    parser.add_argument("--num-edits", type=int, nargs="+", default=[1, 10, 100], help="the T values")
    parser.add_argument("--chunks", type=int, nargs="+", default=[10, 3, 1], help="chunks averaged per T")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    args, extra = parser.parse_known_args()
    if len(args.chunks) != len(args.num_edits):
        parser.error("--chunks needs one count per --num-edits value")
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(markdown_table(compare(args.configs, args.num_edits, args.chunks, args.out, extra)))


if __name__ == "__main__":
    main()
