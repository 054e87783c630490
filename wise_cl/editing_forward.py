"""The editing loop of strategies that train a task vector tau at one Linear layer, and its forwards.

`CachedForward` runs the model once per edit up to the edited layer and caches what does not
change while tau is trained: the layer's input activation and its main-memory output. Each
optimisation step then computes `cached output + tau a` and runs only the layers above.
Rows without scored positions (WISE's irrelevant rows) need only their activation score and
skip the upper layers; the last layer's MLP runs only at the scored positions. `FullForward` is
the plain loop (full model and full logits every step), kept for comparison.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from wise_cl.metrics import per_request_mean
from wise_cl.rows import TeacherForcedBatch
from wise_cl.side_memory import SideMemoryLinear, output_distances, sequence_scores


class _CachedLayer(nn.Module):
    """Stands in for the edited decoder layer: returns its output computed outside the decoder."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        return self.output


class _MLPAtPositions(nn.Module):
    """Runs an MLP only at `positions` ([batch, tokens] bool); other positions get zeros."""

    def __init__(self, mlp: nn.Module, positions: Tensor) -> None:
        super().__init__()
        self.mlp, self.positions = mlp, positions

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape).index_put((self.positions,), self.mlp(x[self.positions]))


@contextmanager
def _last_mlp_only_at(layers: list[nn.Module], positions: Tensor) -> Iterator[None]:
    """Run the MLP of the last of `layers` only where logits are needed: nothing above reads the others."""
    last = layers[-1] if layers else None
    if last is None or not isinstance(getattr(last, "mlp", None), nn.Module):
        yield
        return
    mlp = last.mlp
    last.mlp = _MLPAtPositions(mlp, positions)
    try:
        yield
    finally:
        last.mlp = mlp


@contextmanager
def _layers_swapped(decoder: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """Run the decoder with another list of layers for the duration of the block."""
    original = decoder.layers
    decoder.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        decoder.layers = original


class FullForward:
    """Every step: the whole model, logits at every position (the plain editing loop).

    Activation scores average over the tokens of `score_mask` (default: every real token).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: SideMemoryLinear,
        batch: TeacherForcedBatch,
        score_mask: Tensor | None = None,
    ) -> None:
        self.model, self.adapter, self.batch = model, adapter, batch
        self.score_mask = batch.attention_mask if score_mask is None else score_mask

    def __call__(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the scored positions and the activation score of every row."""
        captured: list[Tensor] = []
        handle = self.adapter.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            b = self.batch
            with self.adapter.trained_with(tau):
                logits = self.model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids
                ).logits
        finally:
            handle.remove()
        scores = sequence_scores(self.adapter.distances(captured[0], tau), self.score_mask)
        return logits[self.batch.scored], scores

    @torch.no_grad()
    def scores(self, tau: Tensor) -> Tensor:
        """The activation score of every row under `tau`."""
        return self(tau)[1]


class CachedForward(FullForward):
    """Lower layers once per edit; every step only `tau a` and the layers above, logits where scored.

    Rows after the last one with a scored position (irrelevant and replayed prompts) need only
    their activation score: their activations are kept packed (real tokens only) and, with `memo`,
    reused from the previous edit where the same tokens came back (the layers below never change).
    `memo` is left holding this edit's score-only rows.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: SideMemoryLinear,
        batch: TeacherForcedBatch,
        layer_path: str,
        score_mask: Tensor | None = None,
        memo: dict[tuple[int, ...], Tensor] | None = None,
    ) -> None:
        super().__init__(model, adapter, batch, score_mask)
        self.decoder = model.base_model
        self.index = decoder_layer_index(layer_path)
        self.upper_layers = list(self.decoder.layers[self.index + 1 :])
        # columns after the last scored position are not needed above the edited layer either
        rows, columns = batch.scored.nonzero(as_tuple=True)
        n, t = self.upper = (int(rows.max()) + 1, int(columns.max()) + 1) if len(rows) else (0, 0)
        real, tail_rows = batch.attention_mask.bool(), range(n, len(batch.input_ids))
        keys = [tuple(batch.input_ids[r, real[r]].tolist()) for r in tail_rows]
        memo = {} if memo is None else memo
        missing = [r for r, key in zip(tail_rows, keys, strict=True) if key not in memo]
        # (with no row going up, row 0 runs anyway so the cached tensors get their shapes)
        activation, self.layer_output = self._lower_pass(batch, list(range(n)) or [0])
        self.activation = activation[:n]
        memo.update({keys[r - n]: a for r, a in zip(missing, self._tail_activations(batch, missing), strict=True)})
        self.tail = [memo[key] for key in keys]  # score-only rows: activations of their real tokens
        memo.clear()
        memo.update(zip(keys, self.tail, strict=True))
        # their scored tokens packed, and the row each token belongs to
        token_masks = [self.score_mask[r, real[r]].bool() for r in tail_rows]
        self.tail_tokens = torch.cat([a[m] for a, m in zip(self.tail, token_masks, strict=True)]) if keys else None
        counts = torch.tensor([int(m.sum()) for m in token_masks], dtype=torch.long)
        self.tail_rows = torch.repeat_interleave(torch.arange(len(keys)), counts).to(batch.input_ids.device)
        self.dummy_embeds = torch.zeros_like(self.layer_output[:, :t])
        # the main memory's output, for scores that put an activation function around both outputs
        activation_around = adapter.score_activation is not None
        self.base_output = adapter.base(self.activation) if activation_around else None
        self.tail_base = adapter.base(self.tail_tokens) if activation_around and keys else None

    def _tail_activations(self, batch: TeacherForcedBatch, rows: list[int], chunk: int = 32) -> list[Tensor]:
        """The edited layer's input activation at the real tokens of each of `rows`. Rows run in chunks of
        similar length, each cut to its own columns: one long text does not pad all the others."""
        real = batch.attention_mask.bool()
        ordered = sorted(rows, key=lambda r: int(real[r].sum()))
        out: dict[int, Tensor] = {}
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            columns = real[part].any(0).nonzero().squeeze(1)
            activation, _ = self._lower_pass(batch, part, columns)
            out.update({r: activation[i][real[r, columns]] for i, r in enumerate(part)})
        return [out[r] for r in rows]

    @torch.no_grad()
    def _lower_pass(
        self, batch: TeacherForcedBatch, rows: list[int], columns: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The edited layer's input activation and main-memory output for `rows` of the batch (and
        only `columns` of them: real tokens lie next to each other, so this cuts padding only)."""
        captured: dict[str, Tensor] = {}
        hooks = [
            self.adapter.register_forward_pre_hook(lambda _, args: captured.__setitem__("a", args[0])),
            self.decoder.layers[self.index].register_forward_hook(
                lambda _, args, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out)
            ),
        ]
        index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)
        cut = (lambda x: x[index][:, columns]) if columns is not None else (lambda x: x[index])
        try:
            with (
                self.adapter.trained_with(torch.zeros_like(self.adapter.weight)),
                _layers_swapped(self.decoder, self.decoder.layers[: self.index + 1]),
            ):
                self.decoder(
                    input_ids=cut(batch.input_ids),
                    attention_mask=cut(batch.attention_mask),
                    position_ids=cut(batch.position_ids),
                )
        finally:
            for hook in hooks:
                hook.remove()
        return captured["a"], captured["out"][: self.upper[0]]

    def full_activation(self) -> Tensor:
        """The edited layer's input activation of every row, [batch, tokens, in], zeros at padding."""
        n, real = self.upper[0], self.batch.attention_mask.bool()
        full = self.activation.new_zeros((*real.shape, self.activation.shape[-1]))
        full[:n] = self.activation
        for i, a in enumerate(self.tail):
            full[n + i, real[n + i]] = a
        return full

    def _scores(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        """`tau a` on the rows that go up, and the activation score of every row."""
        n, activation = self.upper[0], self.adapter.score_activation
        delta = F.linear(self.activation, tau)
        scores = sequence_scores(output_distances(delta, self.base_output, activation), self.score_mask[:n])
        if self.tail_tokens is not None:
            distances = output_distances(F.linear(self.tail_tokens, tau), self.tail_base, activation)
            tail_scores = per_request_mean(distances, self.tail_rows, self.score_mask.shape[0] - n)
            scores = torch.cat([scores, tail_scores.to(scores.dtype)])
        return delta, scores

    def __call__(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        b, (n, t) = self.batch, self.upper
        delta, scores = self._scores(tau)
        if n == 0:
            return delta.new_zeros((0, self.model.config.vocab_size)), scores
        cached = _CachedLayer(self.layer_output[:, :t] + delta[:, :t])
        with (
            _layers_swapped(self.decoder, [cached, *self.upper_layers]),
            _last_mlp_only_at(self.upper_layers, b.scored[:n, :t]),
        ):
            hidden = self.decoder(
                inputs_embeds=self.dummy_embeds,
                attention_mask=b.attention_mask[:n, :t],
                position_ids=b.position_ids[:n, :t],
            ).last_hidden_state
        return few_row_logits(self.model.get_output_embeddings(), hidden[b.scored[:n, :t]]), scores

    @torch.no_grad()
    def scores(self, tau: Tensor) -> Tensor:
        """The activation score of every row under `tau`, from the cached activations alone."""
        return self._scores(tau)[1]


def project_out(tau: Tensor, basis: Tensor | None) -> Tensor:
    """`tau` blind to the input directions `basis` ([in, k], orthonormal columns): `tau (I - U U^T)`."""
    return tau if basis is None else tau - (tau @ basis) @ basis.T


class ProjectedForward:
    """A forward whose task vector reads only the part of the input activation outside `basis`."""

    def __init__(self, forward: FullForward, basis: Tensor) -> None:
        self.forward, self.basis = forward, basis

    def __call__(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(project_out(tau, self.basis))

    @torch.no_grad()
    def scores(self, tau: Tensor) -> Tensor:
        return self.forward.scores(project_out(tau, self.basis))


def few_row_logits(head: nn.Linear, hidden: Tensor) -> Tensor:
    """`head(hidden)` for a few rows, as `weight @ hidden^T`: this reads the large vocabulary matrix
    in its stored layout, about twice as fast on CPU (forward and backward) as `hidden @ weight^T`."""
    logits = (head.weight @ hidden.T).T
    return logits if head.bias is None else logits + head.bias


def decoder_layer_index(layer_path: str) -> int:
    """The decoder layer a module path lies in (`model.layers.24.mlp.down_proj` -> 24)."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", layer_path)
    if match is None:
        raise ValueError(f"'{layer_path}' is not inside a decoder layer ('...layers.<i>....'); use the full forward")
    return int(match.group(1))
