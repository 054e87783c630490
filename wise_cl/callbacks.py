"""Callbacks of a lifelong editing run: WISE memory management, forgetting curves, `predict` answers.

The memory callbacks act after each experience through `after_edit(strategy)`, which the
Lightning hook and the Avalanche plugin both call, so the schedule exists once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, Checkpoint

from wise_cl.evaluation import predict_answers, scored_prompts
from wise_cl.metrics import Forgetting, per_request_score
from wise_cl.plotting import plot_curves
from wise_cl.provenance import file_sha256
from wise_cl.validation import require


class MemoryLifecycle(Protocol):
    """What the memory callbacks call on a strategy (WISE's: `wise_cl.strategies.wise.WISE`)."""

    def shard_full(self) -> bool: ...
    def close_shard(self) -> None: ...
    def group_full(self) -> bool: ...
    def merge(self) -> None: ...
    def memory_complete(self) -> bool: ...
    def spawn(self) -> None: ...


class MemoryCallback(Callback):
    """Runs `after_edit` on the module's strategy after every training batch (experience), adds the
    time it takes to the module's `memory_seconds` and logs it per experience (`memory_seconds/<callback>`).
    The module runs these callbacks before any other, so whatever observes the model sees it after the
    memory's step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start = time.perf_counter()
        self.after_edit(pl_module.strategy)
        seconds = time.perf_counter() - start
        pl_module.memory_seconds += seconds
        pl_module.log(f"memory_seconds/{type(self).__name__}", seconds, batch_size=len(batch))

    def after_edit(self, strategy: MemoryLifecycle) -> None:
        raise NotImplementedError


class KnowledgeSharding(MemoryCallback):
    """Every `edits_per_shard` edits: close the shard and draw a new random subspace."""

    def after_edit(self, strategy: MemoryLifecycle) -> None:
        if strategy.shard_full():
            strategy.close_shard()


class KnowledgeMerging(MemoryCallback):
    """When `shards_per_merge` shards are complete: merge them into the side memory."""

    def after_edit(self, strategy: MemoryLifecycle) -> None:
        if strategy.group_full():
            strategy.merge()


class MemorySpawning(MemoryCallback):
    """WISE-Retrieve: when a merged memory is complete, freeze it and start a new one."""

    def after_edit(self, strategy: MemoryLifecycle) -> None:
        if strategy.memory_complete():
            strategy.spawn()


class EditCheckpoint(Checkpoint):
    """Save `last.ckpt` every `every_n_edits` edits, so a killed stream resumes without losing edits.

    Editing runs its own optimisation, so Lightning's global step (which `ModelCheckpoint` counts)
    does not move; this callback counts edits instead. The file is replaced atomically. Each write logs
    its seconds (`checkpoint/seconds`, with the files written once beside it) and the size of
    `last.ckpt` (`checkpoint/megabytes`).
    """

    def __init__(self, dirpath: str | None = None, every_n_edits: int = 1) -> None:
        require(every_n_edits >= 1, "EditCheckpoint.every_n_edits", "at least 1", every_n_edits, "trainer.callbacks")
        self.dirpath, self.every_n_edits = dirpath, every_n_edits

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.edits_done % self.every_n_edits == 0 or pl_module.edits_done == len(pl_module.stream):
            start = time.perf_counter()
            folder = Path(self.dirpath or Path(trainer.log_dir or ".") / "checkpoints")
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / "last.ckpt.partial"
            pl_module.checkpoint_folder = folder  # where the module writes what it stores once beside the file
            trainer.save_checkpoint(partial, weights_only=False)
            digest = folder / "last.ckpt.sha256.partial"
            digest.write_text(file_sha256(partial) + "\n")
            os.replace(partial, folder / "last.ckpt")  # a kill between the two replaces leaves a mismatch:
            os.replace(digest, folder / "last.ckpt.sha256")  # refused on resume, never loaded half-written
            pl_module.log("checkpoint/seconds", time.perf_counter() - start, batch_size=len(batch))
            pl_module.log("checkpoint/megabytes", (folder / "last.ckpt").stat().st_size / 2**20, batch_size=len(batch))


def request_scores(
    pl_module: L.LightningModule, requests: list, reference: list[torch.Tensor], batch_size: int
) -> dict[str, torch.Tensor]:
    """Per request: reliability, generalization (the mean over its rephrasings), out-of-distribution
    generalization, locality and the target's mean token NLL given the prompt (`target_nll`); NaN where a request
    has no such prompt or an empty locality answer. A score no request has is left out."""
    model, tokenizer = pl_module.model, pl_module.tokenizer
    scores: dict[str, torch.Tensor] = {}
    for name, prompts in scored_prompts(requests).items():
        correct, nll = [], []
        for start in range(0, len(prompts), batch_size):
            owners, texts, answers = zip(*prompts[start : start + batch_size], strict=True)
            out = predict_answers(model, tokenizer, list(texts), list(answers))
            target = torch.cat([reference[i] for i in owners]) if name == "locality" else out.labels
            hits = (out.preds == target.to(out.preds.device)).double()
            correct.append(per_request_score(hits, out.rows, len(texts)))
            if name == "reliability":
                nll.append(per_request_score(out.nll.double(), out.rows, len(texts)))
        owners = torch.tensor([i for i, _, _ in prompts], device=correct[0].device)
        scores[name] = per_request_score(torch.cat(correct), owners, len(requests))
        if nll:
            scores["target_nll"] = per_request_score(torch.cat(nll), owners, len(requests))
    return scores


class ForgettingCurve(Callback):
    """Every `every_n_edits` edits, re-score all edits seen so far and log the forgetting curves.

    Logs mean reliability, generalization, locality, target perplexity and forgetting (best reliability seen
    minus current, per request) against the number of edits; after each point writes the points so far to
    `forgetting_curve.json` and draws them in `forgetting_curve.png`, both in the run folder, so a stream still
    running, or stopped, has its curve. On long streams `max_requests` bounds each point's cost: every k-th edit
    seen is scored (k = stream length / `max_requests`, rounded up), the same edits at every point; 0 scores them
    all. `also_at` adds points off the period (after 955 edits, say, where no merge or spawn has just happened).
    """

    def __init__(self, every_n_edits: int = 10, max_requests: int = 0, also_at: tuple[int, ...] = ()) -> None:
        require(every_n_edits >= 1, "ForgettingCurve.every_n_edits", "at least 1", every_n_edits, "trainer.callbacks")
        require(max_requests >= 0, "ForgettingCurve.max_requests", "0 (all) or more", max_requests, "trainer.callbacks")
        self.every_n_edits, self.max_requests, self.also_at = every_n_edits, max_requests, set(also_at)
        self.history: list[dict[str, float]] = []
        self.forgetting: Forgetting | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done, total = pl_module.edits_done, len(pl_module.stream)
        if done % self.every_n_edits and done != total and done not in self.also_at:
            return
        if self.forgetting is None or len(self.forgetting.best) < total:  # new, or the stream was extended
            self.forgetting = self._grown(total)
        stride = math.ceil(total / self.max_requests) if self.max_requests else 1
        scored = range(0, done, stride)
        requests, reference = [pl_module.stream[i] for i in scored], [pl_module.reference[i] for i in scored]
        scores = request_scores(pl_module, requests, reference, trainer.datamodule.eval_batch_size)
        self.forgetting.update(torch.tensor(scored), scores["reliability"])
        point = {name: float(values.nanmean()) for name, values in scores.items()}
        point["perplexity"] = math.exp(point.pop("target_nll"))  # as `TargetPerplexity`: a geometric mean
        point["forgetting"] = float(self.forgetting.compute())
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in point.items()}, step=done)
        self.history.append({"edits": done, "scored": len(scored), **point})
        if trainer.log_dir:
            folder = Path(trainer.log_dir)
            folder.mkdir(parents=True, exist_ok=True)  # before the first checkpoint makes it
            (folder / "forgetting_curve.json").write_text(json.dumps(self.history, indent=1) + "\n")
            plot_curves({pl_module.strategy.name: self.history}, folder / "forgetting_curve.png")

    def _grown(self, total: int) -> Forgetting:
        """A `Forgetting` over `total` requests holding what the current one has seen."""
        grown = Forgetting(total)
        for name in ("best", "current", "seen") if self.forgetting is not None else ():
            old = getattr(self.forgetting, name)
            getattr(grown, name)[: len(old)] = old
        return grown

    def state_dict(self) -> dict[str, Any]:
        states = {k: getattr(self.forgetting, k) for k in ("best", "current", "seen")} if self.forgetting else None
        return {"history": self.history, "forgetting_states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]
        if state["forgetting_states"] is not None:
            states = state["forgetting_states"]
            self.forgetting = Forgetting(len(states["best"]))
            for name, value in states.items():
                setattr(self.forgetting, name, value)


class AnswerWriter(BasePredictionWriter):
    """Writes `predict`'s answers to `predictions.jsonl` in the log folder, one JSON object per prompt, as each
    batch is answered."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = Path(trainer.log_dir or ".") / "predictions.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self.path.open("a") as out:
            out.writelines(json.dumps(answer) + "\n" for answer in prediction)
