"""Seconds per WISE edit: this implementation (cached forward) against the plain loop, in one run.

python -m wise_cl.benchmarks.edit_speed --config configs/zsre_wise_retrieve.yaml --num-edits 100 --plain-every 20

The run edits the first `--num-edits` ZsRE requests as one stream with the config's WISE settings
(early stopping and the memory callbacks included) and reports the median seconds per edit. Every
`--plain-every`-th edit is also made by the plain loop (full model over the whole edit batch and
full logits every step) from the same state and with the number of steps the cached edit took;
the stream then goes on from the cached result. The speedup is the median of the per-edit time
ratios. `--set key=value` overrides the config's WISE settings (values read as YAML). `--plain-every 0` skips
the plain loop; `--profile-from N` profiles edits N.. (memory callbacks included) and reports where their time
goes: the project's functions by cumulative seconds per profiled edit.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from wise_cl import WISE, EditBatch, load_model, read_requests
from wise_cl.benchmarks.sweep import key_values
from wise_cl.provenance import code_version


def timed_edit(strategy: WISE, batch: EditBatch) -> dict:
    start = time.perf_counter()
    stats = strategy.edit(batch)
    seconds = time.perf_counter() - start
    return {"edit": batch.indices[0], "seconds": seconds, "steps": stats["steps"], "loss": stats["loss"]}


def timed_stream(
    model_name: str,
    settings: dict,
    requests: list,
    plain_every: int,
    profiler: cProfile.Profile | None = None,
    profile_from: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Edit the requests one by one with the cached forward; every `plain_every`-th edit (0: none) is also
    timed with the plain loop from the same state. Seconds and steps per edit, for both loops. `profiler`
    records the cached edits from `profile_from` on, with their memory callbacks."""
    strategy = WISE(**settings)
    strategy.prepare(*load_model(model_name))
    strategy.contexts = strategy.generate_contexts()  # generated once, outside the timed edits
    callbacks, n_iter = strategy.callbacks(), strategy.n_iter
    cached, plain = [], []
    for i, request in enumerate(requests):
        batch = EditBatch([i], [request])
        before = strategy.state_dict() if plain_every and i % plain_every == 0 else None
        recording = profiler if i >= profile_from else None
        with profiled(recording):
            cached.append(timed_edit(strategy, batch))
        if before is not None:
            after = strategy.state_dict()
            strategy.load_state_dict(before)
            strategy.cached_forward, strategy.n_iter = False, cached[-1]["steps"]
            plain.append(timed_edit(strategy, batch))
            strategy.cached_forward, strategy.n_iter = True, n_iter
            strategy.load_state_dict(after)
        with profiled(recording):
            for callback in callbacks:
                callback.after_edit(strategy)
    return cached, plain


@contextmanager
def profiled(profiler: cProfile.Profile | None) -> Iterator[None]:
    """Record the block with `profiler` (nothing when None)."""
    if profiler is None:
        yield
        return
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()


def time_by_function(profiler: cProfile.Profile, edits: int, top: int = 25) -> dict[str, float]:
    """Cumulative seconds per edit of the project's `top` most expensive functions (`file:line(function)`)."""
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)
    ours = {
        f"{Path(file).parent.name}/{Path(file).name}:{line}({function})": cumulative / edits
        for (file, line, function), (*_, cumulative, _) in stats.items()
        if "/wise_cl/" in file or "/strategies/" in file or "/benchmarks/" in file
    }
    return dict(sorted(ours.items(), key=lambda item: -item[1])[:top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/zsre_wise.yaml"))
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--plain-every", type=int, default=20, help="time the plain loop on every k-th edit")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override WISE settings")
    parser.add_argument("--profile-from", type=int, metavar="N", help="profile edits N.. (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())["model"]
    overrides = {key: yaml.safe_load(value) for key, value in key_values(args.set, "--set")} if args.set else {}
    unknown = set(overrides) - set(inspect.signature(WISE).parameters)
    if unknown:
        raise SystemExit(f"--set: WISE has no setting {', '.join(sorted(unknown))}")
    settings = config["strategy"].get("init_args", {}) | overrides
    requests = read_requests("zsre", limit=args.num_edits)
    profile_from = args.profile_from if args.profile_from is not None else args.num_edits
    profiler = cProfile.Profile() if profile_from < args.num_edits else None
    cached, plain = timed_stream(config["model_name"], settings, requests, args.plain_every, profiler, profile_from)
    same = [cached[p["edit"]] for p in plain]
    result = {
        "command": "python -m wise_cl.benchmarks.edit_speed " + shlex.join(sys.argv[1:]),
        "commit": code_version(),
        "config": str(args.config),
        "settings": settings,
        "layer": settings.get("layer"),
        "num_edits": args.num_edits,
        "cached_seconds_per_edit_median": statistics.median(e["seconds"] for e in cached),
        "cached_steps_median": statistics.median(e["steps"] for e in cached),
    }
    if plain:
        result |= {
            "plain_edits": [p["edit"] for p in plain],
            "plain_seconds_per_edit_median": statistics.median(e["seconds"] for e in plain),
            "speedup_median": statistics.median(p["seconds"] / c["seconds"] for p, c in zip(plain, same, strict=True)),
        }
    if profiler is not None:
        result["profiled_edits"] = [profile_from, args.num_edits - 1]
        result["seconds_per_profiled_edit"] = time_by_function(profiler, args.num_edits - profile_from)
    result |= {"cached": cached, "plain": plain}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cached", "plain", "settings")}, indent=2))


if __name__ == "__main__":
    main()
