"""The interface every editing method implements; the harness (Lightning, Avalanche, metrics) uses only this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch


class EditStrategy(ABC):
    """An editing method: prepares the model once, then edits it one experience (batch) at a time."""

    name: str = "strategy"

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Install what the method needs (adapters, buffers) before the first edit."""
        self.model, self.tokenizer = model, tokenizer

    @abstractmethod
    def edit(self, batch: EditBatch) -> dict[str, float]:
        """Apply the edits of one experience; return statistics to log (loss, steps, ...)."""

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
