"""How large a weight-editing run's accumulated changes are next to the weights they change (ROME, MEMIT, MEND).

python -m wise_cl.benchmarks.weight_changes RUN [RUN ...] --out benchmarks/results/weight_changes

RUN is a `wise-cl fit` run folder (checkpoints/last.ckpt) of a strategy that serves its change to every sequence:
ROME's one layer (`tau`) or MEMIT's and MEND's several (`taus`). Per edited layer: the Frobenius norm of the
change, its ratio to the unedited weight's, and the largest singular value (s.v.) of each. Sequential editing that
breaks a model's locality goes with changes that outgrow the weights (Gupta et al., 2024, "Model editing at
scale leads to gradual and catastrophic forgetting"). Writes weight_changes.json and weight_changes.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from wise_cl.benchmarks.compare import markdown_table
from wise_cl.checkpoints import load_run_state
from wise_cl.models import find_module, load_model
from wise_cl.provenance import code_version

COLUMNS = {
    "change_norm": "change norm",
    "weight_norm": "weight norm",
    "norm_ratio": "change / weight norm",
    "change_top_singular": "change top s.v.",
    "weight_top_singular": "weight top s.v.",
}


def run_changes(folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The run's model name and its change per edited layer, as last checkpointed."""
    strategy = load_run_state(folder / "checkpoints" / "last.ckpt")["strategy"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if "taus" in strategy:
        changes = strategy["taus"]
    elif "tau" in strategy:
        changes = {config["model"]["strategy"]["init_args"]["layer"]: strategy["tau"]}
    else:
        raise SystemExit(f"{folder}: its strategy keeps no weight change served to every sequence (ROME, MEMIT, MEND)")
    return config["model"]["model_name"], changes


@functools.cache
def unedited_model(model_name: str) -> torch.nn.Module:
    """The model as loaded, once per name however many runs edit it."""
    return load_model(model_name)[0]


def layer_rows(folder: Path) -> list[dict[str, Any]]:
    """One row per edited layer of the run: the change's size against the weight's."""
    model_name, changes = run_changes(folder)
    model = unedited_model(model_name)
    rows = []
    for layer, change in changes.items():
        weight, change = find_module(model, layer).weight.float(), change.float()
        rows.append(
            {
                "run": str(folder),
                "layer": layer,
                "change_norm": float(change.norm()),
                "weight_norm": float(weight.norm()),
                "norm_ratio": float(change.norm() / weight.norm()),
                "change_top_singular": float(torch.linalg.matrix_norm(change, ord=2)),
                "weight_top_singular": float(torch.linalg.matrix_norm(weight, ord=2)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`wise-cl fit` run folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [row for folder in args.runs for row in layer_rows(folder)]
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "wise_cl.benchmarks.weight_changes", *(argv or sys.argv[1:])])
    result = {"command": command, "commit": code_version(), "layers": rows}
    (args.out / "weight_changes.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_table(rows, {"run": "run", "layer": "layer"}, COLUMNS)
    (args.out / "weight_changes.md").write_text(f"`{command}`\n\nat commit {result['commit']}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
