"""Forward passes for the editing loop, with only a task vector tau trainable at one Linear layer.

`CachedForward` runs the model once per edit up to the edited layer and caches what does not
change while tau is trained: the layer's input activation and its main-memory output. Each
optimisation step then computes `cached output + tau a` and runs only the layers above.
`FullForward` is the plain loop (full model and full logits every step), kept for comparison.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from wise_cl.evaluation import TeacherForcedBatch
from wise_cl.side_memory import SideMemoryLinear, sequence_scores


class _CachedLayer(nn.Module):
    """Stands in for the edited decoder layer: its cached main-memory output plus the side delta."""

    def __init__(self, output: Tensor, activation: Tensor, tau: Tensor, token_mask: Tensor) -> None:
        super().__init__()
        self.output, self.activation, self.tau, self.token_mask = output, activation, tau, token_mask
        self.scores: Tensor | None = None

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        delta = F.linear(self.activation, self.tau)
        self.scores = sequence_scores(delta, self.token_mask)
        return self.output + delta


class FullForward:
    """Every step: the whole model, logits at every position (the plain editing loop)."""

    def __init__(self, model: PreTrainedModel, adapter: SideMemoryLinear, batch: TeacherForcedBatch) -> None:
        self.model, self.adapter, self.batch = model, adapter, batch

    def __call__(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the scored positions and the activation score of every row."""
        captured: list[Tensor] = []
        handle = self.adapter.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        self.adapter.train_tau = tau
        try:
            b = self.batch
            logits = self.model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids
            ).logits
        finally:
            self.adapter.train_tau = None
            handle.remove()
        scores = sequence_scores(F.linear(captured[0], tau), self.batch.attention_mask)
        return logits[self.batch.scored], scores

    @torch.no_grad()
    def scores(self, tau: Tensor) -> Tensor:
        """The activation score of every row under `tau`."""
        return self(tau)[1]


class CachedForward(FullForward):
    """Lower layers once per edit; every step only `tau a` and the layers above, logits where scored."""

    def __init__(
        self, model: PreTrainedModel, adapter: SideMemoryLinear, batch: TeacherForcedBatch, layer_path: str
    ) -> None:
        super().__init__(model, adapter, batch)
        self.decoder = model.base_model
        self.index = decoder_layer_index(layer_path)
        captured: dict[str, Tensor] = {}
        layer = self.decoder.layers[self.index]
        hooks = [
            adapter.register_forward_pre_hook(lambda _, args: captured.__setitem__("a", args[0])),
            layer.register_forward_hook(
                lambda _, args, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)
            ),
        ]
        adapter.train_tau = torch.zeros_like(adapter.weight)
        try:
            with torch.no_grad():
                self.decoder(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
                )
        finally:
            adapter.train_tau = None
            for hook in hooks:
                hook.remove()
        self.activation, self.layer_output = captured["a"], captured["out"]
        self.upper = list(self.decoder.layers[self.index + 1 :])
        self.dummy_embeds = torch.zeros_like(self.layer_output)

    def __call__(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        cached = _CachedLayer(self.layer_output, self.activation, tau, self.batch.attention_mask)
        layers = self.decoder.layers
        self.decoder.layers = nn.ModuleList([cached, *self.upper])
        try:
            b = self.batch
            hidden = self.decoder(
                inputs_embeds=self.dummy_embeds, attention_mask=b.attention_mask, position_ids=b.position_ids
            ).last_hidden_state
        finally:
            self.decoder.layers = layers
        return self.model.get_output_embeddings()(hidden[b.scored]), cached.scores

    @torch.no_grad()
    def scores(self, tau: Tensor) -> Tensor:
        """The activation score of every row under `tau`, from the cached activations alone."""
        return sequence_scores(F.linear(self.activation, tau), self.batch.attention_mask)


def decoder_layer_index(layer_path: str) -> int:
    """The decoder layer a module path lies in (`model.layers.24.mlp.down_proj` -> 24)."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", layer_path)
    if match is None:
        raise ValueError(f"'{layer_path}' is not inside a decoder layer ('...layers.<i>....'); use the full forward")
    return int(match.group(1))
