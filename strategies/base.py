"""The interface every editing method implements; the harness (Lightning, Avalanche, metrics) uses only this."""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.records import read_irrelevant_prompts
from wise_cl.side_memory import SideMemoryLinear, attach_side_memory, detach_side_memory


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic's mean over the requests (or loops) of one experience."""
    return {name: statistics.fmean(s[name] for s in stats) for name in stats[0]}


class EditStrategy(ABC):
    """An editing method: prepares the model once, then edits it one experience (batch) at a time."""

    name: str = "strategy"
    # keys of `state_dict()` holding lists that only grow, whose items never change once made: a checkpoint
    # writes each item once, to its own file beside it
    written_once: tuple[str, ...] = ()
    # constructor settings that change only how the edited model answers, not what the edits wrote: a
    # checkpoint may be scored (`wise-cl test`, `predict`) with other values of them
    serving_settings: tuple[str, ...] = ()

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Install what the method needs (adapters, buffers) before the first edit."""
        self.model, self.tokenizer = model, tokenizer

    @abstractmethod
    def edit(self, batch: EditBatch) -> dict[str, float]:
        """Apply the edits of one experience; return statistics to log (loss, steps, ...)."""

    def flush(self) -> None:
        """Complete any edits the method holds back (MEMIT with `defer_update`); the harness calls it after the
        stream's last edit and before it scores the model."""
        return None

    def callbacks(self) -> list[Any]:
        """Lightning callbacks that manage the method's state between experiences."""
        return []

    def describe(self) -> dict[str, Any]:
        """Facts about the edited model for the run's metrics.json."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything the edits changed, for checkpoints (tensors and plain Python values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, on a model prepared the same way."""


class LinearEditStrategy(EditStrategy):
    """A method that edits one Linear layer (`self.layer`) through a `SideMemoryLinear` adapter; the base
    weight is never written, so `detach` gives back the unedited model.

    Subclasses set `adapter_cls` for another route decision or output, and `irrelevant_source` when they
    train against irrelevant texts (read into `self.irrelevant` by `prepare`).
    """

    adapter_cls: type[SideMemoryLinear] = SideMemoryLinear
    layer: str
    irrelevant_source: str | None = None

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.irrelevant = read_irrelevant_prompts(self.irrelevant_source) if self.irrelevant_source else []
        self.adapter = attach_side_memory(model, self.layer, self.adapter_cls)

    def detach(self) -> None:
        """Remove the adapter; the model is the unedited one again."""
        detach_side_memory(self.model, self.layer)


class ServedTaskVectors:
    """For methods that change several Linear layers: `taus[layer]`, each layer's change, is served to every
    sequence by `adapters[layer]` (no router); `edits` counts the edits made."""

    layer: str
    layers: list[str]
    adapters: dict[str, SideMemoryLinear]
    taus: dict[str, Tensor]
    edits: int

    def publish(self) -> None:
        for layer, adapter in self.adapters.items():
            adapter.serve([self.taus[layer]], [-math.inf])

    def describe(self) -> dict[str, Any]:
        norm = float(torch.stack([tau.norm() for tau in self.taus.values()]).norm())
        return {"layer": self.layer, "layers": self.layers, "tau_norm": norm, "edits": self.edits}

    def state_dict(self) -> dict[str, Any]:
        return {"taus": {k: v.clone() for k, v in self.taus.items()}, "edits": self.edits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for layer, tau in state["taus"].items():
            self.taus[layer].copy_(tau)
        self.edits = state["edits"]
        self.publish()
