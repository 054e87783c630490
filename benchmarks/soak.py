"""Kill a `wise-cl fit` stream at random moments, resume it each time, and check that it ends exactly where an
uninterrupted run of the same stream ends (side memories bit for bit, scores equal).

python -m wise_cl.benchmarks.soak --config configs/zsre_wise_retrieve.yaml --num-edits 50 --kills 10 \
    --out benchmarks/results/soak

Each kill is SIGKILL at a uniform random moment between `--min-seconds` and `--max-seconds` after the
process starts (seeded), so kills land in model loading, mid-edit, mid-checkpoint-write and mid-merge alike;
the next start resumes with `--ckpt_path last`. Writes `soak.json` with every kill and the comparison.
A start spends about 40 s loading before its first edit on the bundled model (about 13 s per edit after
that), so the default window (15-150 s) lets ten kills move through most of a 50-edit stream; a window
that ends near the loading time kills the same few edits over and over.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from wise_cl.checkpoints import load_run_state, verified_checkpoint
from wise_cl.provenance import code_version

SCORES = ("reliability", "generalization", "locality", "exact_match", "perplexity", "edits_done")


def fit_command(config: Path, out: Path, name: str, num_edits: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "wise_cl.cli",
        "fit",
        f"--config={config}",
        f"--data.num_edits={num_edits}",
        *extra,
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=run",
    ]


def edits_in(folder: Path) -> int:
    """Edits held by the run's checkpoint (0 before the first one is written)."""
    path = folder / "checkpoints" / "last.ckpt"
    if not path.exists():
        return 0
    return torch.load(verified_checkpoint(path), weights_only=True)["wise_cl"]["edits_done"]


def killed_run(command: list[str], folder: Path, kills: int, window: tuple[float, float], seed: int) -> list[dict]:
    """Run `command` to the end, SIGKILLing it `kills` times; every restart resumes the last checkpoint."""
    rng, log = random.Random(seed), []
    while True:
        resume = ["--ckpt_path=last"] if (folder / "checkpoints" / "last.ckpt").exists() else []
        process = subprocess.Popen([*command, *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if len(log) == kills:
            if process.wait() != 0:
                raise SystemExit(f"the final resume failed: {shlex.join(command)}")
            return log
        delay = rng.uniform(*window)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            log.append({"after_seconds": round(delay, 1), "edits_saved": edits_in(folder)})
            print(json.dumps(log[-1]), flush=True)
            continue
        if process.returncode != 0:
            raise SystemExit(f"a run failed before its kill: {shlex.join(command)}")
        return log  # finished before the remaining kills


def final_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's scores and the strategy state of its last checkpoint."""
    metrics = json.loads((folder / "metrics.json").read_text())
    state = load_run_state(folder / "checkpoints" / "last.ckpt")
    return {k: metrics.get(k) for k in SCORES}, state["strategy"]


def same(a: Any, b: Any) -> bool:
    """Equal, tensors bit for bit, through lists and dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--num-edits", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=15.0)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args, extra = parser.parse_known_args(argv)
    start = time.perf_counter()
    whole = fit_command(args.config, args.out, "uninterrupted", args.num_edits, extra)
    if not (args.out / "uninterrupted" / "run" / "metrics.json").exists():
        subprocess.run(whole, check=True, stdout=subprocess.DEVNULL)
    killed_folder = args.out / "killed" / "run"
    killed = fit_command(args.config, args.out, "killed", args.num_edits, extra)
    kills = killed_run(killed, killed_folder, args.kills, (args.min_seconds, args.max_seconds), args.seed)
    scores, state = final_state(args.out / "uninterrupted" / "run")
    killed_scores, killed_state = final_state(killed_folder)
    result = {
        "command": "python -m wise_cl.benchmarks.soak " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": code_version(),
        "kills": kills,
        "uninterrupted": scores,
        "killed_and_resumed": killed_scores,
        "same_scores": scores == killed_scores,
        "same_side_memories": same(state, killed_state),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "kills"}, indent=1))
    return result


if __name__ == "__main__":
    main()
