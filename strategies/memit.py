"""MEMIT (Meng et al., 2023, "Mass-Editing Memory in a Transformer"): ROME's value change spread over several
consecutive MLP output projections, for a batch of edits at once.

Per experience: each request's value change d_i is optimised at the last layer's output (ROME's procedure),
which sets the target residual z_i = h_i + d_i at that layer (the subject's last token of the bare prompt).
Then layer by layer from the first: the keys K (each request's layer input at the subject's last token,
averaged over its prompts) and the gap still open, R = (z - h) / (layers left), give the least-squares change
W_l += R^T K (lambda C_l + K^T K)^-1, which maps K towards R while keeping the corpus keys' outputs
(C_l = E[k k^T] over the corpus, weight lambda). One experience holding the whole stream is MEMIT-MASS
(`data.edits_per_experience` at least T); one edit per experience is MEMIT applied edit by edit. With
`defer_update`, each experience only computes its requests' targets and the batch update over all of them waits
for the stream's end (`flush`): MEMIT-MASS again, but checkpointed request by request, so a long stream resumes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.editing_forward import decoder_layer_index
from wise_cl.key_statistics import cached_second_moments, captured_outputs
from wise_cl.records import EditRequest, read_corpus
from wise_cl.side_memory import attach_side_memory, detach_side_memory
from wise_cl.strategies.base import ServedTaskVectors, mean_stats
from wise_cl.strategies.rome import ROME
from wise_cl.validation import require


def consecutive_layers(last: str, count: int) -> list[str]:
    """`count` module paths like `last` in the consecutive decoder layers that end at its own
    (`model.layers.8.mlp.down_proj`, 3 -> layers 6, 7 and 8)."""
    index = decoder_layer_index(last)
    require(count <= index + 1, "num_layers", f"at most {index + 1} (layers 0..{index} end at `layer`)", count)
    return [
        re.sub(r"(^|\.)layers\.\d+\.", rf"\1layers.{i}.", last, count=1) for i in range(index - count + 1, index + 1)
    ]


class MEMIT(ServedTaskVectors, ROME):
    """MEMIT: ROME's edit spread over `num_layers` MLP output projections ending at `layer` (see the module
    docstring); every experience is one batch update.

    Args:
        layer: the last edited projection, where the value changes are optimised.
        num_layers: consecutive layers edited, ending at `layer`.
        moment_weight: lambda, the weight of the corpus keys' second moment against the batch's keys.
        defer_update: hold every experience's targets and make one batch update over all of them when the
            harness flushes the strategy (after the stream's last edit, before scoring); the model stays unedited
            until then, as MEMIT-MASS computes every target on the unedited model.
        **kwargs: ROME's value-change, prefix and corpus settings.
    """

    name = "memit"

    def __init__(
        self,
        layer: str = "model.layers.8.mlp.down_proj",
        num_layers: int = 5,
        moment_weight: float = 15000.0,
        defer_update: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(layer=layer, **kwargs)
        require(num_layers >= 1, "num_layers", "at least 1", num_layers)
        require(moment_weight > 0, "moment_weight", "positive", moment_weight)
        self.num_layers, self.moment_weight, self.defer_update = num_layers, moment_weight, defer_update
        self.layers = consecutive_layers(layer, num_layers)

    def measure_keys(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """C_l for every edited layer (from the corpus, cached)."""
        corpus = read_corpus(self.corpus)
        self.moments = cached_second_moments(model, tokenizer, self.layers, corpus, self.corpus_tokens)

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.adapters = {layer: attach_side_memory(model, layer) for layer in self.layers[:-1]} | {
            self.layer: self.adapter
        }
        self.taus = {layer: torch.zeros_like(adapter.weight) for layer, adapter in self.adapters.items()}
        self.tau = self.taus[self.layer]
        self.residual = model.base_model.layers[decoder_layer_index(self.layer)]  # its output: the residual stream
        self.held_requests: list[EditRequest] = []
        self.held_targets: list[Tensor] = []
        self.update_seconds = 0.0

    def detach(self) -> None:
        for layer in self.layers[:-1]:
            detach_side_memory(self.model, layer)
        super().detach()

    # editing ------------------------------------------------------------------------------------

    def edit(self, batch: EditBatch) -> dict[str, float]:
        requests = batch.requests
        targets, stats = self.targets(requests)
        if self.defer_update:
            self.held_requests += requests
            self.held_targets += list(targets)
        else:
            self.spread(requests, targets)
        self.edits += len(requests)
        return stats

    def flush(self) -> None:
        """`defer_update`: one batch update over every held request (nothing to do otherwise)."""
        if self.held_requests:
            start = time.perf_counter()
            self.spread(self.held_requests, torch.stack(self.held_targets))
            self.held_requests, self.held_targets = [], []
            self.update_seconds += time.perf_counter() - start

    def targets(self, requests: list[EditRequest]) -> tuple[Tensor, dict[str, float]]:
        """Per request, the residual z = h + d its value change d asks for after the last edited layer:
        [requests, out]; with the mean of the value optimisations' statistics."""
        start = self.residual_at_subject(requests)
        stats, changes = [], []
        for request, key in zip(requests, self.keys(self.adapter, requests), strict=True):
            change, request_stats = self.value_change(request, key)
            changes.append(change)
            stats.append(request_stats)
        return start + torch.stack(changes), mean_stats(stats)

    def spread(self, requests: list[EditRequest], target: Tensor) -> None:
        """Close the gap between the residual and `target` layer by layer, each layer taking its share."""
        for index, layer in enumerate(self.layers):
            keys = self.keys(self.adapters[layer], requests)
            gap = (target - self.residual_at_subject(requests)) / (len(self.layers) - index)
            self.taus[layer] += self.layer_update(layer, keys, gap)
            self.publish()

    @torch.no_grad()
    def residual_at_subject(self, requests: list[EditRequest]) -> Tensor:
        """The residual stream after the last edited layer at each bare prompt's subject token: [requests, out]."""
        rows, at = self.rows_at_subject(
            [r.prompt for r in requests], [r.subject for r in requests], [""] * len(requests)
        )
        with captured_outputs(self.residual) as outputs:
            self.run(rows)
        return outputs[0][torch.arange(len(requests)), at]

    def layer_update(self, layer: str, keys: Tensor, gap: Tensor) -> Tensor:
        """The change D minimising ||D K^T - R^T||^2 + lambda tr(D C D^T): D = R^T K (lambda C + K^T K)^-1."""
        keys = keys.double()
        system = self.moment_weight * self.moments[layer].to(keys.device) + keys.T @ keys
        return (gap.double().T @ torch.linalg.solve(system, keys.T).T).to(self.tau.dtype)

    # checkpoints --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **({"batch_update_seconds": self.update_seconds} if self.defer_update else {})}

    def state_dict(self) -> dict[str, Any]:
        held = {
            "held_requests": [dataclasses.asdict(request) for request in self.held_requests],
            "held_targets": [target.clone() for target in self.held_targets],
        }
        return {**super().state_dict(), "prefixes": self.prefixes, **held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prefixes = state["prefixes"]
        self.held_requests = [EditRequest(**request) for request in state.get("held_requests", [])]
        self.held_targets = list(state.get("held_targets", []))
        super().load_state_dict(state)
