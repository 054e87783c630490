"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of key -> replacement output at one layer.

Keys are the layer's input activation at the last prompt token of an edit, each with a deferral
radius; values replace the layer's output. At inference a sequence switches to a key's value at
the first token whose input lies within the radius of its nearest key, and keeps it for every
later token (also while generating). Sequences that match no key are computed exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.editing_forward import CachedForward
from wise_cl.optimisation import edit_nll, optimise
from wise_cl.rows import TeacherForcedBatch, teacher_forced_batch
from wise_cl.side_memory import MAIN, SideMemoryLinear
from wise_cl.strategies.base import LinearEditStrategy
from wise_cl.validation import require


class GraceLinear(SideMemoryLinear):
    """A frozen Linear with a GRACE codebook: `keys` [K, in], `values` [K, out], `radii` [K].

    `route` holds each sequence's key (or MAIN), decided on a fresh input and kept while a
    generation continues (see `SideMemoryLinear`); `train_tau` keeps its meaning for the
    editing forward (the codebook is then bypassed).
    """

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base)
        self.keys = base.weight.new_zeros((0, base.in_features))
        self.values = base.weight.new_zeros((0, base.out_features))
        self.radii = base.weight.new_zeros(0)

    def match(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per sequence, the key its first in-radius real token matches (or MAIN), and that token's position."""
        batch, length, _ = a.shape
        distance = torch.cdist(a.reshape(-1, a.shape[-1]).float(), self.keys.float())
        nearest, key = distance.view(batch, length, -1).min(-1)
        hit = nearest <= self.radii[key]
        mask = self.token_mask
        if mask is not None and mask.shape == hit.shape:
            hit &= mask.bool()
        start = hit.float().argmax(-1)  # the first hit (0 where none)
        matched = key.gather(1, start[:, None]).squeeze(1)
        return torch.where(hit.any(-1), matched, torch.full_like(matched, MAIN)), start

    def forward(self, a: Tensor) -> Tensor:
        if self.train_tau is not None or not len(self.keys):
            return super().forward(a)
        out = self.base(a)
        if self.keep_route and self.route is not None and self.route.shape[0] == a.shape[0]:
            start = torch.zeros_like(self.route)  # a matched sequence keeps its value for every new token
        else:
            self.route, start = self.match(a)
        positions = torch.arange(a.shape[1], device=a.device)
        replace = (self.route != MAIN)[:, None] & (positions[None, :] >= start[:, None])
        value = self.values[self.route.clamp(min=0)].to(out.dtype)
        return torch.where(replace[..., None], value[:, None, :], out)


class ValueForward(CachedForward):
    """The editing forward of GRACE: each row's layer output is replaced by a trainable value from
    its key position (the last prompt token) on.

    Written as CachedForward's `layer output + F.linear(activation, tau)`: the cached layer output
    loses the layer's own contribution where it is replaced, the activation becomes the one-hot
    selector of the row's value slot there (`use_slots`), and `tau` is the value matrix [out, slots].
    """

    def __init__(self, model: PreTrainedModel, adapter: GraceLinear, rows: TeacherForcedBatch, layer: str) -> None:
        super().__init__(model, adapter, rows, layer)
        start = rows.scored.float().argmax(-1)  # the first scored position: the last prompt token
        self.keys = self.activation[torch.arange(len(start)), start]
        self.key_outputs = adapter.base(self.keys)  # the layer's own output at each key
        positions = torch.arange(rows.input_ids.shape[1], device=start.device)
        self.replaced = (positions[None, :] >= start[:, None]).to(self.activation.dtype)[..., None]
        self.layer_output = self.layer_output - self.replaced * adapter.base(self.activation)

    def use_slots(self, slots: list[int]) -> None:
        """Row i takes its value from column `slots[i]` of tau."""
        selector = F.one_hot(torch.tensor(slots, device=self.replaced.device), max(slots) + 1)
        self.activation = self.replaced * selector.to(self.replaced)[:, None, :]


class GRACE(LinearEditStrategy):
    """GRACE: a codebook adaptor at one Linear layer; base weights stay frozen.

    Each edit's key is the layer input at its last prompt token. A key farther than its nearest
    codebook key's radius plus `epsilon` is added with radius `epsilon`; otherwise, with the same
    target that key's radius grows to cover it, with a different target both radii shrink to half
    their distance and the new key is added. Values start from the layer's own output at the key
    and are trained by SGD on the target NLL, replacing the layer output from the key position on.

    Args:
        layer: module path of the Linear the codebook wraps.
        epsilon: initial deferral radius of a key (Euclidean distance in the layer's input space).
        lr: SGD learning rate on the values (large: one vector has to move the residual stream;
            1000 suits SmolLM2-135M at layer 25).
        n_iter: optimisation steps per experience at most.
        early_stop_loss: stop an experience's loop once the loss is below this.
    """

    name = "grace"
    adapter_cls = GraceLinear
    adapter: GraceLinear

    def __init__(
        self,
        layer: str = "model.layers.25.mlp.down_proj",
        epsilon: float = 1.0,
        lr: float = 1000.0,
        n_iter: int = 50,
        early_stop_loss: float = 0.01,
    ) -> None:
        require(epsilon > 0, "epsilon", "positive", epsilon)
        require(lr > 0, "lr", "positive", lr)
        require(n_iter >= 1, "n_iter", "at least 1", n_iter)
        self.layer, self.epsilon = layer, epsilon
        self.lr, self.n_iter, self.early_stop_loss = lr, n_iter, early_stop_loss

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.keys, self.values, self.radii = self.adapter.keys, self.adapter.values, self.adapter.radii
        self.targets: list[str] = []

    def edit(self, batch: EditBatch) -> dict[str, float]:
        rows = teacher_forced_batch(
            self.tokenizer, [r.prompt for r in batch.requests], [r.target for r in batch.requests]
        ).to(self.model.device)
        forward = ValueForward(self.model, self.adapter, rows, self.layer)
        slots = [
            self.place_key(key, value, request.target)
            for key, value, request in zip(forward.keys, forward.key_outputs, batch.requests, strict=True)
        ]
        trained = sorted(set(slots))
        forward.use_slots([trained.index(slot) for slot in slots])
        values = self.values[trained].T.clone().requires_grad_(True)

        def loss_fn(logits: Tensor, scores: Tensor) -> dict[str, Tensor]:
            return {"loss": edit_nll(logits, rows, len(batch)).mean()}

        stats = optimise(forward, values, loss_fn, self.lr, self.n_iter, self.early_stop_loss)
        self.values[trained] = values.detach().T
        self.publish()
        return {**stats, "codebook_size": len(self.keys)}

    def place_key(self, key: Tensor, value: Tensor, target: str) -> int:
        """Update the codebook for one edit's key (add, expand or split) and return the key that holds it."""
        if len(self.keys):
            distance, index = (self.keys.float() - key.float()).norm(dim=-1).min(0)
            d, nearest = float(distance), int(index)
            if d <= self.radii[nearest] + self.epsilon:
                if self.targets[nearest] == target:
                    self.radii[nearest] = max(float(self.radii[nearest]), d)
                    return nearest
                self.radii[nearest] = d / 2 - 1e-5
                return self.add_key(key, value, target, d / 2)
        return self.add_key(key, value, target, self.epsilon)

    def add_key(self, key: Tensor, value: Tensor, target: str, radius: float) -> int:
        self.keys = torch.cat([self.keys, key.detach()[None]])
        self.values = torch.cat([self.values, value.detach()[None]])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.targets.append(target)
        return len(self.keys) - 1

    def publish(self) -> None:
        """Hand the codebook to the adapter."""
        self.adapter.keys, self.adapter.values, self.adapter.radii = self.keys, self.values, self.radii

    def describe(self) -> dict[str, Any]:
        mean_radius = float(self.radii.mean()) if len(self.radii) else 0.0
        return {"layer": self.layer, "codebook_size": len(self.keys), "mean_radius": mean_radius}

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.clone(),
            "values": self.values.clone(),
            "radii": self.radii.clone(),
            "targets": list(self.targets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.adapter.weight.device
        self.keys, self.values, self.radii = (state[k].to(device) for k in ("keys", "values", "radii"))
        self.targets = list(state["targets"])
        self.publish()
