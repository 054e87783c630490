"""Run editing strategies on the same stream at several T and tabulate reliability, generalization,
locality, the free-generation scores and seconds per edit (markdown + JSON), with one plot of the
forgetting curves. The table shows the scores the data set has: out-of-distribution generalization
(temporal) and target perplexity (hallucination, as the paper reports it) among them.

python -m wise_cl.benchmarks.compare --configs configs/zsre_wise.yaml configs/zsre_wise_retrieve.yaml \
    --num-edits 1 10 100 --chunks 10 3 1 --out benchmarks/results/zsre_wise

T = 1 and 10 average `chunks` consecutive chunks of T requests, each edited from the unedited model
(reset between chunks, as in the paper); a single chunk is one stream of T edits. Every chunk is a
`wise-cl fit` run (its own process) logged to TensorBoard under `<out>/tensorboard/<strategy>/T<T>-chunk<k>`. Arguments
after `--` go to every run (`-- --model.strategy.init_args.alpha=2`). A rerun skips finished chunks
and resumes an interrupted one from its last checkpoint. `--unedited` adds the unedited model's row.
`--finished-only` runs nothing and tabulates the chunks already finished (a row's `chunks` says how many),
for a table whose long runs are still to come; results.md lists the missing runs.
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

# the scores a table can show and their column heads; a table leaves out the columns no row has
QUALITY = {
    "reliability": "Rel.",
    "generalization": "Gen.",
    "ood_generalization": "OOD Gen.",
    "locality": "Loc.",
    "perplexity": "PPL",
    "exact_match": "EM",
    "answer_match": "AM",
    "rephrase_answer_match": "reph. AM",
    "generation_locality": "gen. Loc.",
}
COST = {"edit_seconds_median": "s/edit"}
SCORES = QUALITY | COST
LOWER_IS_BETTER = {"perplexity", *COST}
COMPARE_LEAD = {"strategy": "strategy", "T": "T", "chunks": "chunks", "commit": "commit"}
UNEDITED = "unedited"  # the row name of the unedited model


def strategy_name(config: Path) -> str:
    """`configs/zsre_wise_retrieve.yaml` -> `wise_retrieve`."""
    return config.stem.split("_", 1)[-1]


def finished_metrics(folder: Path) -> dict[str, Any] | None:
    """The metrics.json of the run logged to `folder` as a dict; None while the run has not finished."""
    metrics = folder / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def run_fit(config: Path, folder: Path, args: list[str], subcommand: str = "fit") -> dict[str, Any]:
    """One `wise-cl fit` run of `config` with `args` (or `wise-cl test`: the unedited model scored), logged to
    `folder`; its metrics.json as a dict.

    A finished run (metrics.json present) is not run again; an interrupted one resumes from its checkpoint.
    """
    if (finished := finished_metrics(folder)) is not None:
        return finished
    args = [
        subcommand,
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
    return json.loads((folder / "metrics.json").read_text())


def chunk_folder(out: Path, name: str, num_edits: int, chunk: int) -> Path:
    """Where the run of chunk `chunk` at T=`num_edits` logs."""
    return out / "tensorboard" / name / f"T{num_edits}-chunk{chunk}"


def run_chunk(
    config: Path, name: str, num_edits: int, chunk: int, out: Path, extra: list[str], subcommand: str = "fit"
) -> dict[str, Any]:
    """One `wise-cl fit` (or `test`) run over requests `chunk * T .. chunk * T + T - 1`; its metrics.json as a dict."""
    folder = chunk_folder(out, name, num_edits, chunk)
    args = [*extra, f"--data.num_edits={num_edits}", f"--data.start={chunk * num_edits}"]  # the chunk wins
    return run_fit(config, folder, args, subcommand)


def summarise(name: str, num_edits: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each score over the chunks of one (strategy, T)."""
    commits = sorted({r.get("commit", "unknown")[:7] for r in runs})
    row: dict[str, Any] = {"strategy": name, "T": num_edits, "chunks": len(runs), "commit": ",".join(commits)}
    for key in SCORES:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
    return row


def cell(value: Any) -> str:
    """A score as a table cell: 3 decimals, `-` where missing."""
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]], lead: dict[str, str], columns: dict[str, str]) -> str:
    """One line per row: the `lead` keys as they are, then the `columns` some row has a value for."""
    shown = {key: head for key, head in columns.items() if any(row.get(key) is not None for row in rows)}
    heads = [*lead.values(), *shown.values()]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in (*lead, *shown)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare(
    configs: list[Path],
    num_edits: list[int],
    chunks: list[int],
    out: Path,
    extra: list[str],
    unedited: bool = False,
    finished_only: bool = False,
) -> list[dict[str, Any]]:
    """Run every config at every T; write results.json, results.md and forgetting_curves.png to `out`.

    With `unedited`, the first row group is the unedited model scored on the same chunks (`wise-cl test` with the
    first config: its model and data, no edit). With `finished_only`, nothing runs: the table holds the chunks
    already finished and results.md names the missing ones."""
    rows, runs, curves, missing = [], [], {}, []
    jobs = [(configs[0], UNEDITED, "test")] if unedited else []
    for config, name, subcommand in jobs + [(config, strategy_name(config), "fit") for config in configs]:
        for t, count in zip(num_edits, chunks, strict=True):
            results = {}  # chunk -> its metrics
            for k in range(count):
                if finished_only:
                    metrics = finished_metrics(chunk_folder(out, name, t, k))
                else:
                    metrics = run_chunk(config, name, t, k, out, extra, subcommand)
                if metrics is None:
                    missing.append(f"{name} T{t}-chunk{k}")
                else:
                    results[k] = metrics
            runs += [{**r, "strategy": name, "T": t, "chunk": k} for k, r in results.items()]
            if results:
                rows.append(summarise(name, t, list(results.values())))
                print(json.dumps(rows[-1]), flush=True)
        curve = chunk_folder(out, name, max(num_edits), 0) / "forgetting_curve.json"
        if curve.exists() and finished_metrics(curve.parent) is not None:
            curves[name] = json.loads(curve.read_text())
    command = "python -m wise_cl.benchmarks.compare " + shlex.join(sys.argv[1:])
    result = {"command": command, "commit": code_version(), "rows": rows, "runs": runs, "missing": missing}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    note = f"summarised at commit {result['commit']}; each row names the commits of its runs (first 7 digits)"
    if missing:
        note += f"\n\nnot run yet (finished runs only): {', '.join(missing)}"
    (out / "results.md").write_text(f"`{command}`\n\n{note}\n\n" + markdown_table(rows, COMPARE_LEAD, SCORES))
    if curves:
        plot_curves(curves, out / "forgetting_curves.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+", required=True, help="one wise-cl YAML per strategy")
    parser.add_argument("--num-edits", type=int, nargs="+", default=[1, 10, 100], help="the T values")
    parser.add_argument("--chunks", type=int, nargs="+", default=[10, 3, 1], help="chunks averaged per T")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--unedited", action="store_true", help="also score the unedited model on the same chunks")
    parser.add_argument(
        "--finished-only", action="store_true", help="run nothing: tabulate the chunks already finished"
    )
    args, extra = parser.parse_known_args()
    if len(args.chunks) != len(args.num_edits):
        parser.error("--chunks needs one count per --num-edits value")
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = compare(args.configs, args.num_edits, args.chunks, args.out, extra, args.unedited, args.finished_only)
    print(markdown_table(rows, COMPARE_LEAD, SCORES))


if __name__ == "__main__":
    main()
