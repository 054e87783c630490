"""Sweep strategy hyper-parameters on one stream of T edits; one row of scores per setting.

python -m wise_cl.benchmarks.sweep --config configs/zsre_wise.yaml --num-edits 30 \
    --variant "layer=model.layers.25.mlp.down_proj" --variant "alpha=2 beta=10 gamma=5" \
    --out benchmarks/results/sweep_wise

Each variant sets `model.strategy.init_args.<key>=<value>` on top of the config and is one
`wise-cl fit` run per chunk (see `compare.py`: finished runs are skipped, interrupted ones resume),
under `tensorboard/v<n>/`; `variants.json` records which variant each `v<n>` is (a variant keeps its
number across reruns, a new one takes the next).
`--chunks 0 1` scores every variant on requests 0..T-1 and on the held-out T..2T-1. Arguments after `--`
go to every run (`-- --data.path temporal_train`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from wise_cl.benchmarks.compare import SCORES, markdown_table, run_chunk


def key_values(items: list[str], option: str) -> list[tuple[str, str]]:
    """`["alpha=2", "beta=10"]` -> `[("alpha", "2"), ("beta", "10")]`, or an error naming `option`."""
    pairs = [tuple(item.split("=", 1)) for item in items]
    if not pairs or any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"{option} '{' '.join(items)}': expected space-separated key=value pairs")
    return pairs


def variant_args(variant: str) -> list[str]:
    """`"alpha=2 beta=10"` -> the CLI overrides of the strategy's init_args (`""`: none, the config as it is)."""
    if not variant.strip():
        return []
    return [f"--model.strategy.init_args.{key}={value}" for key, value in key_values(variant.split(), "--variant")]


def run_variant(
    config: Path, variant: str, name: str, num_edits: int, chunk: int, out: Path, extra: list[str]
) -> dict[str, Any]:
    """One chunk of `config` with `variant`'s settings, logged as run `name`: its commit and scores."""
    result = run_chunk(config, name, num_edits, chunk, out, [*extra, *variant_args(variant)])
    return {"commit": result.get("commit")} | {key: result.get(key) for key in SCORES}


def run_names(out: Path, variants: list[str]) -> dict[str, str]:
    """The run folder name of each variant (`v1`, `v2`, ...), kept in `out/variants.json`."""
    path = out / "variants.json"
    names: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    taken = {int(name[1:]) for name in names.values()}
    for variant in variants:
        if variant not in names:
            number = max(taken, default=0) + 1
            names[variant], taken = f"v{number}", taken | {number}
    path.write_text(json.dumps(names, indent=1) + "\n")
    return names


def write_results(out: Path, command: str, rows: list[dict]) -> str:
    """`sweep.json` and `sweep.md` (one row per variant and chunk); the table."""
    (out / "sweep.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    rows = [row | {"variant": f"`{row['variant']}`"} for row in rows]
    table = markdown_table(rows, {"variant": "variant", "run": "run", "chunk": "chunk"}, SCORES)
    (out / "sweep.md").write_text(f"`{command}`\n\n{table}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--num-edits", type=int, default=30)
    parser.add_argument("--variant", action="append", required=True, help='e.g. "layer=... alpha=2"')
    parser.add_argument("--chunks", type=int, nargs="+", default=[0], help="chunk c = requests c*T..c*T+T-1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    names = run_names(args.out, args.variant)
    rows = []
    for variant in args.variant:
        for chunk in args.chunks:
            scores = run_variant(args.config, variant, names[variant], args.num_edits, chunk, args.out, extra)
            rows.append({"variant": variant, "run": names[variant], "chunk": chunk} | scores)
            print(json.dumps(rows[-1]), flush=True)
    command = "python -m wise_cl.benchmarks.sweep " + shlex.join(sys.argv[1:])
    print(write_results(args.out, command, rows))


if __name__ == "__main__":
    main()
