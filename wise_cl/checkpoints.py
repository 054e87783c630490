"""Checkpoint files of an editing run: `last.ckpt` checked against its SHA-256 sidecar, and tensors that never
change once made (WISE-Retrieve's frozen memories) written once each beside it, so that a checkpoint's size
and write time stay flat however many of them a long stream accumulates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from wise_cl.provenance import file_sha256


def verified_checkpoint(path: str | Path) -> Path:
    """`path` if it is a checkpoint `EditCheckpoint` wrote and its SHA-256 still matches; else a `ValueError`
    that names it (a damaged or foreign file is never loaded)."""
    path = Path(path)
    digest = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    if not digest.is_file():
        raise ValueError(f"{path}: no {digest.name} beside it, so it cannot be checked; start the run again")
    if file_sha256(path) != digest.read_text().strip():
        raise ValueError(f"{path}: damaged (its SHA-256 differs from {digest.name}); start the run again")
    return path


class WrittenOnce:
    """Writes the items of a growing list of tensors to `<folder>/<key>/<index>.safetensors`, each the first
    time it is seen, and stands a reference `{"file", "sha256"}` in for it in the checkpoint.

    An item is rewritten only when a different tensor object stands at its index (after a resume, or if the
    list was changed), so a killed write never leaves a checkpoint pointing at a half-written file.
    """

    def __init__(self) -> None:
        self.written: dict[str, list[tuple[Tensor, dict[str, str]]]] = {}

    def references(self, folder: Path, key: str, tensors: list[Tensor]) -> list[dict[str, str]]:
        known = self.written.setdefault(key, [])
        del known[len(tensors) :]
        for index, tensor in enumerate(tensors):
            if index < len(known) and known[index][0] is tensor:
                continue
            name = f"{key}/{index:05d}.safetensors"
            path, partial = folder / name, folder / f"{name}.partial"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"tensor": tensor.detach().contiguous()}, str(partial))
            reference = {"file": name, "sha256": file_sha256(partial)}
            os.replace(partial, path)
            known[index:] = [(tensor, reference)]
        return [reference for _, reference in known]


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and value.keys() == {"file", "sha256"}


def read_written_once(state: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`state` with every list of `WrittenOnce` references replaced by its tensors, read from `folder` and
    checked against their SHA-256 (a missing or damaged file is refused with its path)."""
    resolved = dict(state)
    for key, value in state.items():
        if isinstance(value, list) and value and all(is_reference(item) for item in value):
            resolved[key] = [read_tensor(folder / item["file"], item["sha256"]) for item in value]
    return resolved


def read_tensor(path: Path, sha256: str) -> Tensor:
    if not path.is_file():
        raise ValueError(f"{path}: not found, but the checkpoint beside it needs it; start the run again")
    if file_sha256(path) != sha256:
        raise ValueError(f"{path}: damaged (its SHA-256 differs from the checkpoint's record); start the run again")
    try:
        return load_file(str(path))["tensor"]
    except (OSError, KeyError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a tensor file wise-cl wrote ({error})") from error


def load_run_state(path: str | Path) -> dict[str, Any]:
    """The `wise_cl` part of a verified checkpoint, with its strategy's written-once tensors read back."""
    path = verified_checkpoint(path)
    state = torch.load(path, weights_only=True)["wise_cl"]
    return {**state, "strategy": read_written_once(state["strategy"], path.parent)}
