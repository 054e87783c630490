"""The Lightning module of a lifelong editing run: each training batch is one experience of edits."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from wise_cl.callbacks import MemoryCallback
from wise_cl.data import EditBatch
from wise_cl.evaluation import EditMetrics, locality_reference
from wise_cl.models import load_model
from wise_cl.strategies.base import EditStrategy
from wise_cl.strategies.wise import WISE


class EditingModule(L.LightningModule):
    """Runs an `EditStrategy` over the edit stream (`fit`) and scores the model (`test`).

    Args:
        model_name: Hugging Face name or path, `smollm2-135m` (bundled) or `tiny` (tests).
        strategy: the editing method.
        exact_match: also score greedy free generation (slower).
    """

    def __init__(
        self, model_name: str = "smollm2-135m", strategy: EditStrategy | None = None, exact_match: bool = True
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model, self.tokenizer = load_model(model_name)
        self.strategy = strategy if strategy is not None else WISE()
        self.strategy.prepare(self.model, self.tokenizer)
        self.metrics = EditMetrics(exact_match=exact_match)
        self.edits_done = 0
        self.edit_seconds: list[float] = []
        self.memory_seconds = 0.0  # spent by the memory callbacks (closing shards, merging, spawning)
        self.reference: list[Tensor] | None = None
        self.test_results: dict[str, float] = {}
        self.run_config: dict[str, Any] | None = None  # the resolved config, set by `wise-cl`

    @property
    def stream(self) -> list:
        return self.trainer.datamodule.requests

    def configure_callbacks(self) -> list[Callback]:
        return self.strategy.callbacks()

    def configure_optimizers(self) -> None:
        """The strategy runs its own optimisation inside each edit."""

    def transfer_batch_to_device(self, batch: EditBatch, device: Any, dataloader_idx: int) -> EditBatch:
        return batch  # edit requests are text; tensors are made on the model's device when needed

    def ensure_locality_reference(self) -> list[Tensor]:
        """The unedited model's locality predictions for the whole stream, computed once (after checking
        that every text fits the model's context)."""
        if self.reference is None:
            limit = getattr(self.model.config, "max_position_embeddings", None)
            if limit:
                self.trainer.datamodule.check_lengths(self.tokenizer, limit)
            self.reference = locality_reference(self.model, self.tokenizer, self.stream)
        return self.reference

    def on_fit_start(self) -> None:
        # the memory lifecycle (closing shards, merging, spawning) runs before anything that observes the model
        self.trainer.callbacks.sort(key=lambda callback: not isinstance(callback, MemoryCallback))
        self.ensure_locality_reference()

    def training_step(self, batch: EditBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        stats = self.strategy.edit(batch)
        seconds = (time.perf_counter() - start) / len(batch)
        self.edit_seconds += [seconds] * len(batch)
        self.edits_done += len(batch)
        self.log_dict({f"edit/{k}": float(v) for k, v in stats.items()}, batch_size=len(batch))
        self.log("s_per_edit", seconds, prog_bar=True, batch_size=len(batch))
        self.log("edits", float(self.edits_done), prog_bar=True, batch_size=len(batch))

    def on_test_epoch_start(self) -> None:
        self.ensure_locality_reference()
        self.metrics.reset()

    def test_step(self, batch: EditBatch, batch_idx: int) -> None:
        self.metrics.update(self.model, self.tokenizer, batch.requests, [self.reference[i] for i in batch.indices])

    def on_test_epoch_end(self) -> None:
        self.test_results = self.metrics.compute()
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items()})

    def summary(self) -> dict[str, Any]:
        """Final scores plus how the run edited, for metrics.json."""
        edit_seconds = statistics.median(self.edit_seconds) if self.edit_seconds else None
        return {
            **self.test_results,
            "num_edits": len(self.stream),
            "edits_done": self.edits_done,
            "strategy": self.strategy.name,
            "edit_seconds_median": edit_seconds,
            "edit_seconds_total": sum(self.edit_seconds),
            "memory_seconds_total": self.memory_seconds,
            **self.strategy.describe(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}  # the base model is frozen: keep only what editing changed
        checkpoint["wise_cl"] = {
            "strategy": self.strategy.state_dict(),
            "edits_done": self.edits_done,
            "edit_seconds": self.edit_seconds,
            "memory_seconds": self.memory_seconds,
            "locality_reference": self.reference,
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["wise_cl"]
        self.strategy.load_state_dict(state["strategy"])
        self.edits_done, self.edit_seconds = state["edits_done"], list(state["edit_seconds"])
        self.memory_seconds = state.get("memory_seconds", 0.0)
        self.reference = state["locality_reference"]
