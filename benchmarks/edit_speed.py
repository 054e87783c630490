"""Seconds per WISE edit: cached forward (this implementation) against the plain loop, same edits and steps.

python -m wise_cl.benchmarks.edit_speed --num-edits 3 --n-iter 20 --out benchmarks/results/edit_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from wise_cl.data import EditBatch
from wise_cl.models import load_model
from wise_cl.records import read_requests
from wise_cl.strategies.wise import WISE


def seconds_per_edit(model_name: str, requests: list, cached: bool, n_iter: int, layer: str) -> list[float]:
    """Edit the requests one by one with a fixed number of steps (no early stop); seconds per edit."""
    model, tokenizer = load_model(model_name)
    strategy = WISE(layer=layer, n_iter=n_iter, early_stop_loss=0.0, cached_forward=cached)
    strategy.prepare(model, tokenizer)
    strategy.contexts = strategy._generate_contexts()  # generated once, outside the timed edits
    times = []
    for i, request in enumerate(requests):
        start = time.perf_counter()
        strategy.edit(EditBatch([i], [request]))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", default="model.layers.25.mlp.down_proj")
    parser.add_argument("--num-edits", type=int, default=3)
    parser.add_argument("--n-iter", type=int, default=70)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    args = parser.parse_args()
    requests = read_requests("zsre", limit=args.num_edits)
    cached = seconds_per_edit(args.model, requests, True, args.n_iter, args.layer)
    plain = seconds_per_edit(args.model, requests, False, args.n_iter, args.layer)
    result = {
        "model": args.model,
        "layer": args.layer,
        "num_edits": args.num_edits,
        "n_iter": args.n_iter,
        "cached_seconds_per_edit": statistics.median(cached),
        "plain_seconds_per_edit": statistics.median(plain),
        "speedup": statistics.median(plain) / statistics.median(cached),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
