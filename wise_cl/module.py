"""The Lightning module of a lifelong editing run: each training batch is one experience of edits."""

from __future__ import annotations

import gc
import inspect
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from wise_cl.callbacks import AnswerWriter, MemoryCallback
from wise_cl.checkpoints import WrittenOnce, read_written_once, verified_checkpoint
from wise_cl.data import EditBatch
from wise_cl.evaluation import EditMetrics, generation_reference, locality_reference
from wise_cl.models import load_model
from wise_cl.provenance import file_sha256
from wise_cl.records import resolve_data_path
from wise_cl.serving import answer_prompts, side_memories_file
from wise_cl.side_memory import load_side_memories
from wise_cl.strategies.base import EditStrategy
from wise_cl.strategies.wise import WISE


class EditingModule(L.LightningModule):
    """Runs an `EditStrategy` over the edit stream (`fit`) and scores the model (`test`).

    Args:
        model_name: Hugging Face name or path, `smollm2-135m` (bundled) or `tiny` (tests).
        strategy: the editing method.
        exact_match: also score greedy free generation (slower): exact match, answer match on prompts and
            rephrasings, generation locality.
        side_memories: for `test` and `predict`, answer with these side memories (an export folder or a
            side-memory file) instead of a run's checkpoint.
    """

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        strategy: EditStrategy | None = None,
        exact_match: bool = True,
        side_memories: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model_name = model_name
        self.model, self.tokenizer = load_model(model_name)
        self.strategy = strategy if strategy is not None else WISE()
        self.strategy.prepare(self.model, self.tokenizer)
        self.metrics = EditMetrics(exact_match=exact_match)
        self.side_memories = side_memories
        self.edits_done = 0
        self.edit_seconds: list[float] = []
        self.memory_seconds = 0.0  # spent by the memory callbacks (closing shards, merging, spawning)
        self.reference: list[Tensor] | None = None
        self.generation_reference: list[Tensor] | None = None
        self.test_results: dict[str, float] = {}
        self.run_config: dict[str, Any] | None = None  # the resolved config, set by `wise-cl`
        self.checkpoint_folder: Path | None = None  # set by `EditCheckpoint` before it saves
        self.written_once = WrittenOnce()

    @property
    def stream(self) -> list:
        return self.trainer.datamodule.requests

    def configure_callbacks(self) -> list[Callback]:
        return [*self.strategy.callbacks(), AnswerWriter()]

    def setup(self, stage: str) -> None:
        if self.side_memories is None:
            return
        if stage == "fit":
            raise ValueError("model.side_memories: for `test` and `predict` only (`fit` edits its own memories)")
        if stage == "test":  # the references are the unedited model's
            self.ensure_locality_reference()
        load_side_memories(self.model, side_memories_file(self.side_memories))

    def configure_optimizers(self) -> None:
        """The strategy runs its own optimisation inside each edit."""

    def transfer_batch_to_device(self, batch: EditBatch, device: Any, dataloader_idx: int) -> EditBatch:
        return batch  # edit requests are text; tensors are made on the model's device when needed

    def ensure_locality_reference(self) -> None:
        """The unedited model's locality predictions (and, when free generation is scored, its continuations of
        the locality prompts) for the whole stream, computed once, after checking that every text fits the
        model's context."""
        if self.reference is None:
            limit = getattr(self.model.config, "max_position_embeddings", None)
            if limit:
                self.trainer.datamodule.check_lengths(self.tokenizer, limit)
            self.reference = locality_reference(self.model, self.tokenizer, self.stream)
        if self.generation_reference is None and self.metrics.exact_match_enabled and not self.edits_done:
            self.generation_reference = generation_reference(self.model, self.tokenizer, self.stream)

    def on_fit_start(self) -> None:
        # the memory lifecycle (closing shards, merging, spawning) runs before anything that observes the model
        self.trainer.callbacks.sort(key=lambda callback: not isinstance(callback, MemoryCallback))
        self.ensure_locality_reference()
        # The model, tokenizer and stream live as long as the run: out of the garbage collector's reach, its full
        # collections stop walking their half a million objects (.2-.3 s each, every few dozen edits of a long stream)
        gc.freeze()

    def on_train_start(self) -> None:
        # Lightning skips `on_train_epoch_start` when it resumes mid-epoch, where the progress bar gets its total
        # (TQDM showed "Training: 107/?", Rich no bar at all): give it that call
        bar = self.trainer.progress_bar_callback
        if bar is not None and self.trainer.fit_loop.restarted_mid_epoch:
            bar.on_train_epoch_start(self.trainer, self)

    def on_train_end(self) -> None:
        self.strategy.flush()

    def on_fit_end(self) -> None:
        gc.unfreeze()

    def training_step(self, batch: EditBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        stats = self.strategy.edit(batch)
        seconds = (time.perf_counter() - start) / len(batch)
        self.edit_seconds += [seconds] * len(batch)
        self.edits_done += len(batch)
        self.log_dict({f"edit/{k}": float(v) for k, v in stats.items()}, batch_size=len(batch))
        self.log("s_per_edit", seconds, prog_bar=True, batch_size=len(batch))
        self.log("edits", float(self.edits_done), prog_bar=True, batch_size=len(batch))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far (Linux: KiB)
        self.log("peak_rss_megabytes", peak, batch_size=len(batch))

    def on_test_epoch_start(self) -> None:
        self.ensure_locality_reference()
        self.strategy.flush()  # a checkpoint saved before the stream's end may hold edits back
        self.metrics.reset()

    def test_step(self, batch: EditBatch, batch_idx: int) -> None:
        generated = self.generation_reference
        self.metrics.update(
            self.model,
            self.tokenizer,
            batch.requests,
            [self.reference[i] for i in batch.indices],
            [generated[i] for i in batch.indices] if generated is not None else None,
        )

    def predict_step(self, batch: list[tuple[str, str]], batch_idx: int) -> list[dict[str, Any]]:
        """Answers to the batch's prompts, each recorded as given (not as the chat template wrapped it)."""
        answers = answer_prompts(self.model, self.tokenizer, [model_input for _, model_input in batch])
        return [answer | {"prompt": given} for answer, (given, _) in zip(answers, batch, strict=True)]

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
        strategy = self.strategy.state_dict()
        for key in self.strategy.written_once if self.checkpoint_folder is not None else ():
            strategy[key] = self.written_once.references(self.checkpoint_folder, key, strategy[key])
        checkpoint["wise_cl"] = {
            "strategy": strategy,
            "edits_done": self.edits_done,
            "edit_seconds": self.edit_seconds,
            "memory_seconds": self.memory_seconds,
            "locality_reference": self.reference,
            "generation_reference": self.generation_reference,
            "config": self.run_config,
            "identity": self.run_identity(),
        }

    def run_identity(self) -> dict[str, Any]:
        """What a checkpoint belongs to: the model, the strategy with its settings, and the stream (its data
        file's SHA-256, first request and layout; a stream may grow, so not its length)."""
        data = self.trainer.datamodule
        return {
            "model": self.model_name,
            "strategy": f"{type(self.strategy).__module__}.{type(self.strategy).__qualname__}",
            "settings": strategy_settings(self.strategy),
            "data_sha256": file_sha256(resolve_data_path(data.path)),
            "start": data.start,
            "layout": data.layout,
            **({"chat_template": True} if data.chat_template else {}),  # absent otherwise: older runs resume
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume a stream: refused onto another model, strategy, setting or stream (a longer stream of the
        same requests is the same stream, extended; a setting the checkpoint does not name must be at its
        default; scoring a checkpoint may change the strategy's `serving_settings`)."""
        path, state = verified_checkpoint(self.trainer.ckpt_path), checkpoint["wise_cl"]
        saved, current = state.get("identity"), self.run_identity()
        if saved is None:
            raise ValueError(f"{path}: made by an older wise-cl that did not record its run; start the run again")
        for key, value in saved.items():
            if key == "settings":
                value = setting_defaults(self.strategy) | value  # a setting newer than the checkpoint: its default
                names = sorted(set(value) | set(current[key]))
                changed = {n: (value.get(n), current[key].get(n)) for n in names if value.get(n) != current[key].get(n)}
                if self.trainer.state.fn != TrainerFn.FITTING:  # scoring, not editing: serving settings may change
                    changed = {n: v for n, v in changed.items() if n not in self.strategy.serving_settings}
                if changed:
                    raise ValueError(f"{path}: made with other strategy settings (saved, here): {changed}")
            elif current[key] != value:
                raise ValueError(f"{path}: made for another run ({key} {value!r}, here {current[key]!r})")
        if state["edits_done"] > len(self.stream):
            raise ValueError(f"{path}: holds {state['edits_done']} edits, more than data.num_edits={len(self.stream)}")
        self.reference = list(state["locality_reference"])
        generated = state.get("generation_reference")  # absent from older checkpoints: not scored then
        self.generation_reference = list(generated) if generated is not None else None
        if len(self.reference) < len(self.stream):  # extended: the new requests' reference, before any edit loads
            self.reference += locality_reference(self.model, self.tokenizer, self.stream[len(self.reference) :])
            if self.generation_reference is not None:
                new = self.stream[len(self.generation_reference) :]
                self.generation_reference += generation_reference(self.model, self.tokenizer, new)
            # the saved loop may have ended its epoch, which would end this fit at once: edits_done says where to go on
            checkpoint.pop("loops", None)
        self.strategy.load_state_dict(read_written_once(state["strategy"], path.parent))
        self.edits_done, self.edit_seconds = state["edits_done"], list(state["edit_seconds"])
        self.memory_seconds = state.get("memory_seconds", 0.0)


def constructor_parameters(strategy: EditStrategy) -> dict[str, inspect.Parameter]:
    """The parameters of the strategy's constructors by name (a subclass's wins)."""
    parameters: dict[str, inspect.Parameter] = {}
    for cls in reversed(type(strategy).__mro__):
        if "__init__" in vars(cls):
            parameters |= inspect.signature(cls.__init__).parameters
    return parameters


def strategy_settings(strategy: EditStrategy) -> dict[str, Any]:
    """The strategy's constructor arguments that it keeps under their own names (plain values only)."""
    plain = (bool, int, float, str, type(None))
    names = sorted(constructor_parameters(strategy))
    return {name: getattr(strategy, name) for name in names if isinstance(getattr(strategy, name, ()), plain)}


def setting_defaults(strategy: EditStrategy) -> dict[str, Any]:
    """The defaults of the strategy's constructor arguments."""
    parameters = constructor_parameters(strategy).values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
