"""Seconds per WISE edit: this implementation (cached forward) against the plain loop, in one run.

python -m wise_cl.benchmarks.edit_speed --config configs/zsre_wise.yaml --num-edits 100 --plain-edits 5 \
    --set layer=model.layers.25.mlp.down_proj

The cached run edits the first `--num-edits` ZsRE requests as one stream with the config's WISE
settings (early stopping and the memory callbacks included) and reports the median seconds per
edit. The plain loop (full model and full logits every step) then edits the first `--plain-edits`
of the same requests with at most the number of steps each took in the cached run, so both loops
do the same work; the speedup is the median of the per-edit time ratios. `--set key=value` overrides
the config's WISE settings (values read as YAML).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import yaml

from wise_cl.benchmarks.sweep import key_values
from wise_cl.data import EditBatch
from wise_cl.models import load_model
from wise_cl.records import read_requests
from wise_cl.strategies.wise import WISE


def timed_stream(model_name: str, settings: dict, requests: list, steps: list[int] | None = None) -> list[dict]:
    """Edit the requests one by one; seconds and steps per edit. With `steps`, the plain loop edits
    instead, edit i running at most `steps[i]` steps (the same early stop ends it where it ended before)."""
    model, tokenizer = load_model(model_name)
    strategy = WISE(**settings) if steps is None else WISE(**settings | {"cached_forward": False})
    strategy.prepare(model, tokenizer)
    strategy.contexts = strategy._generate_contexts()  # generated once, outside the timed edits
    callbacks = strategy.callbacks()
    edits = []
    for i, request in enumerate(requests):
        if steps is not None:
            strategy.n_iter = steps[i]
        start = time.perf_counter()
        stats = strategy.edit(EditBatch([i], [request]))
        edits.append({"seconds": time.perf_counter() - start, "steps": stats["steps"]})
        for callback in callbacks:
            callback.after_edit(strategy)
    return edits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/zsre_wise.yaml"))
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--plain-edits", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override WISE settings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())["model"]
    overrides = {key: yaml.safe_load(value) for key, value in key_values(args.set, "--set")} if args.set else {}
    unknown = set(overrides) - set(inspect.signature(WISE).parameters)
    if unknown:
        raise SystemExit(f"--set: WISE has no setting {', '.join(sorted(unknown))}")
    settings = config["strategy"].get("init_args", {}) | overrides
    requests = read_requests("zsre", limit=args.num_edits)
    cached = timed_stream(config["model_name"], settings, requests)
    head = cached[: args.plain_edits]
    plain = timed_stream(config["model_name"], settings, requests[: args.plain_edits], [e["steps"] for e in head])
    result = {
        "command": "python -m wise_cl.benchmarks.edit_speed " + shlex.join(sys.argv[1:]),
        "config": str(args.config),
        "layer": settings.get("layer"),
        "num_edits": args.num_edits,
        "cached_seconds_per_edit_median": statistics.median(e["seconds"] for e in cached),
        "cached_steps_median": statistics.median(e["steps"] for e in cached),
        "plain_edits": args.plain_edits,
        "plain_seconds_per_edit_median": statistics.median(e["seconds"] for e in plain),
        "speedup_median": statistics.median(p["seconds"] / c["seconds"] for p, c in zip(plain, head, strict=True)),
        "cached": cached,
        "plain": plain,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cached", "plain")}, indent=2))


if __name__ == "__main__":
    main()
