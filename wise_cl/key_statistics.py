"""Hooks on one Linear layer (its inputs, the "keys" in ROME's words, captured; a vector added to its output at
chosen tokens) and the keys' second moment over a text corpus, computed once per model, layer and corpus and
cached on disk (as any tensor a model determines can be, with `cached_tensor`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.models import cache_dir, find_module


@contextmanager
def captured_inputs(module: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, the input of every forward of `module` is appended to the yielded list."""
    inputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _module, args, _output: inputs.append(args[0]))
    try:
        yield inputs
    finally:
        handle.remove()


@contextmanager
def captured_outputs(module: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, the output of every forward of `module` (its first element, for a tuple) is appended."""
    outputs: list[Tensor] = []
    handle = module.register_forward_hook(
        lambda _module, _args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        yield outputs
    finally:
        handle.remove()


@contextmanager
def added_to_output(module: nn.Module, rows: Tensor, positions: Tensor, vector: Tensor | None) -> Iterator[None]:
    """Within the block, `vector` is added to `module`'s output at each (row, position) pair (None: nothing)."""

    def add(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        return out.index_put((rows, positions), vector.to(out.dtype).expand(len(rows), -1), accumulate=True)

    handle = module.register_forward_hook(add) if vector is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: list[str],
    texts: list[str],
    max_tokens: int = 128,
) -> dict[str, Tensor]:
    """Per layer, E[k k^T] (float64, [in, in]) of its input k over the real tokens of `texts` (each cut to
    `max_tokens` tokens), all from one pass over the texts."""
    totals: dict[str, Tensor | float] = dict.fromkeys(layers, 0.0)
    count = 0
    with ExitStack() as stack:
        captured = {layer: stack.enter_context(captured_inputs(find_module(model, layer))) for layer in layers}
        for start in range(0, len(texts), 8):
            batch = tokenizer(
                texts[start : start + 8],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=True,
                max_length=max_tokens,
            ).to(model.device)
            model(**batch)
            real = batch["attention_mask"].bool()
            for layer, inputs in captured.items():
                keys = inputs.pop()[real].double()
                totals[layer] = totals[layer] + keys.T @ keys
            count += int(real.sum())
    return {layer: total / count for layer, total in totals.items()}


def model_fingerprint(model: PreTrainedModel) -> str:
    """The model's config and a checksum of its weights (cheap: one sum per tensor)."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{float(tensor.double().sum()):.10e}".encode())
    return digest.hexdigest()


def cached_tensor(fingerprint: str, kind: str, key: list, compute: Callable[[], Tensor]) -> Tensor:
    """`compute()`, read from the user cache instead when it ran before for this model (`fingerprint`), `kind` (the
    cache's subfolder) and `key` (values JSON can write), and written there when not."""
    path = _cache_path(fingerprint, kind, key)
    if path.is_file():
        return _read_cached(path)
    tensor = compute()
    _write_cached(path, tensor)
    return tensor


def cached_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: list[str],
    texts: list[str],
    max_tokens: int = 128,
) -> dict[str, Tensor]:
    """`second_moments`, each read from the user cache when this model, layer and corpus were seen before (the
    missing ones computed in one pass and cached)."""
    fingerprint = model_fingerprint(model)
    paths = {layer: _cache_path(fingerprint, "key_statistics", [layer, texts, max_tokens]) for layer in layers}
    computed = second_moments(
        model, tokenizer, [layer for layer in layers if not paths[layer].is_file()], texts, max_tokens
    )
    for layer, moment in computed.items():
        _write_cached(paths[layer], moment)
    return {layer: computed[layer] if layer in computed else _read_cached(paths[layer]) for layer in layers}


def _cache_path(fingerprint: str, kind: str, key: list) -> Path:
    name = json.dumps([fingerprint, *key]).encode()
    return cache_dir() / kind / f"{hashlib.sha256(name).hexdigest()[:32]}.safetensors"


def _write_cached(path: Path, tensor: Tensor) -> None:
    """Write through a partial file, so that an interrupted run never leaves a truncated entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"tensor": tensor.contiguous()}, str(partial))
    partial.replace(path)


def _read_cached(path: Path) -> Tensor:
    (tensor,) = load_file(str(path)).values()
    return tensor
