"""The Avalanche front end: an edit stream as an Avalanche benchmark, and a template that runs any `EditStrategy`.

The editing itself lives in the `EditStrategy` (the same object the Lightning `EditingModule` drives);
this module only feeds it experiences and reports `EditMetrics` through Avalanche's `EvaluationPlugin`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from avalanche.benchmarks import CLExperience, CLScenario
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.core import BasePlugin
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.logging import BaseLogger, InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import BaseTemplate
from avalanche.training.utils import trigger_plugins
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch, EditRequests
from wise_cl.evaluation import EditMetrics, generation_reference, locality_reference
from wise_cl.records import EditRequest
from wise_cl.strategies.base import EditStrategy


def edit_benchmark(requests: Sequence[EditRequest], edits_per_experience: int = 1) -> CLScenario:
    """A `train` stream with one experience per `edits_per_experience` consecutive requests, and a `test`
    stream with all requests in one experience. Items are `(stream index, EditRequest)`."""
    if not requests:
        raise ValueError("edit_benchmark needs at least one request")
    if edits_per_experience < 1:
        raise ValueError(f"edits_per_experience must be at least 1, got {edits_per_experience}")
    data = EditRequests(list(requests))

    def part(indices: range) -> AvalancheDataset:
        return AvalancheDataset([data], indices=list(indices), collate_fn=EditBatch.collate)

    size, step = len(data), edits_per_experience
    train = [part(range(first, min(first + step, size))) for first in range(0, size, step)]
    return benchmark_from_datasets(train=train, test=[part(range(size))])


class _EditorMetric(PluginMetric[dict[str, float]]):
    """Emits a dict of values the `AvalancheEditor` computed, against the number of edits applied."""

    def __init__(self) -> None:
        super().__init__()
        self._values: dict[str, float] = {}

    def result(self) -> dict[str, float]:
        return dict(self._values)

    def reset(self) -> None:
        self._values = {}

    def _emit(self, strategy: AvalancheEditor, values: dict[str, float]) -> list[MetricValue]:
        self._values = dict(values)
        return [
            MetricValue(self, get_metric_name(name, strategy, add_task=False), value, strategy.edits_done)
            for name, value in values.items()
        ]


class EditScores(_EditorMetric):
    """The `EditMetrics` of the evaluated stream, named like `reliability/eval_phase/test_stream`."""

    def after_eval(self, strategy: AvalancheEditor) -> list[MetricValue]:
        return self._emit(strategy, strategy.scores)


class EditStats(_EditorMetric):
    """What the strategy reported for the last experience (`edit/loss`, ...) and `edit/s_per_edit`."""

    def after_training_exp(self, strategy: AvalancheEditor) -> list[MetricValue]:
        return self._emit(strategy, {f"edit/{name}": value for name, value in strategy.edit_stats.items()})


def edit_evaluator(loggers: Sequence[BaseLogger] | None = None) -> EvaluationPlugin:
    """An `EvaluationPlugin` with `EditScores` and `EditStats`; `loggers` default to an `InteractiveLogger`."""
    return EvaluationPlugin(EditScores(), EditStats(), loggers=[InteractiveLogger()] if loggers is None else loggers)


class AvalancheEditor(BaseTemplate):
    """Runs an `EditStrategy` over an Avalanche edit stream (`train`) and scores the model (`eval`).

    Each training experience is one `EditBatch` for `strategy.edit`, followed by `after_edit(strategy)`
    of every object in `strategy.callbacks()`, in order.
    The locality reference (the unedited model's predictions for all `requests`, which item stream
    indices point into) is computed once, at the first `train` or `eval` call, so before any edit.

    Args:
        model: the model to edit; `strategy.prepare(model, tokenizer)` runs here.
        tokenizer: its tokenizer.
        strategy: the editing method.
        requests: every request of the benchmark, in stream order (what `edit_benchmark` got).
        evaluator: an `EvaluationPlugin` (or a factory for one) holding `EditScores` / `EditStats`.
        exact_match: also score greedy free generation.
        eval_batch_size: requests per batch when scoring.
        device: where the model runs; defaults to where it is.
        plugins: further Avalanche plugins.
    """

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        strategy: EditStrategy,
        requests: Sequence[EditRequest],
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = edit_evaluator,
        exact_match: bool = True,
        eval_batch_size: int = 16,
        device: str | torch.device | None = None,
        plugins: Sequence[BasePlugin] | None = None,
    ) -> None:
        super().__init__(model=model, device=model.device if device is None else device, plugins=plugins)
        self.tokenizer, self.strategy, self.requests = tokenizer, strategy, list(requests)
        self.strategy.prepare(model, tokenizer)
        self.memory_callbacks = strategy.callbacks()
        self.evaluator = evaluator if isinstance(evaluator, EvaluationPlugin) else evaluator()
        self.plugins.append(self.evaluator)
        self.metrics = EditMetrics(exact_match=exact_match)
        self.eval_batch_size = eval_batch_size
        self.reference: list[Tensor] | None = None
        self.generation_reference: list[Tensor] | None = None
        self.edits_done = 0
        self.edit_stats: dict[str, float] = {}
        self.scores: dict[str, float] = {}
        self.dataloader: DataLoader | list = []  # the eval batches; InteractiveLogger sizes its progress bar by it

    def ensure_locality_reference(self) -> None:
        """The unedited model's locality predictions (and continuations, when free generation is scored) for all
        requests, computed once."""
        if self.reference is None:
            self.reference = locality_reference(self.model, self.tokenizer, self.requests)
        if self.generation_reference is None and self.metrics.exact_match_enabled:
            self.generation_reference = generation_reference(self.model, self.tokenizer, self.requests)

    def train(self, experiences: CLExperience | Iterable[CLExperience], **kwargs: Any) -> dict[str, Any]:
        """Edit the experiences in order; return the last value of every metric."""
        super().train(experiences, **kwargs)
        return self.evaluator.get_last_metrics()

    def eval(self, experiences: CLExperience | Iterable[CLExperience], **kwargs: Any) -> dict[str, Any]:
        """Score the requests of the experiences (one stream); return the last value of every metric."""
        super().eval(experiences, **kwargs)
        return self.evaluator.get_last_metrics()

    def _before_training(self, **kwargs: Any) -> None:
        self.model.eval()  # the frozen model edits without dropout, as under Lightning
        self.ensure_locality_reference()
        super()._before_training(**kwargs)

    def _train_exp(self, experience: CLExperience, eval_streams: Any = None, **kwargs: Any) -> None:
        batch = EditBatch.collate(list(experience.dataset))
        start = time.perf_counter()
        stats = self.strategy.edit(batch)
        seconds = (time.perf_counter() - start) / len(batch)
        self.edits_done += len(batch)
        self.edit_stats = {**{name: float(value) for name, value in stats.items()}, "s_per_edit": seconds}
        for callback in self.memory_callbacks:
            callback.after_edit(self.strategy)

    def _before_eval(self, **kwargs: Any) -> None:
        self.ensure_locality_reference()
        self.strategy.flush()
        self.metrics.reset()
        super()._before_eval(**kwargs)

    def _before_eval_exp(self, **kwargs: Any) -> None:
        data = self.experience.dataset
        self.dataloader = DataLoader(data, batch_size=self.eval_batch_size, collate_fn=EditBatch.collate)
        super()._before_eval_exp(**kwargs)

    def _eval_exp(self, **kwargs: Any) -> None:
        for batch in self.dataloader:
            generated = [self.generation_reference[i] for i in batch.indices] if self.generation_reference else None
            reference = [self.reference[i] for i in batch.indices]
            self.metrics.update(self.model, self.tokenizer, batch.requests, reference, generated)
            trigger_plugins(self, "after_eval_iteration", **kwargs)

    def _after_eval(self, **kwargs: Any) -> None:
        self.scores = self.metrics.compute()
        super()._after_eval(**kwargs)
