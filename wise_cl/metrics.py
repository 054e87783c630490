"""Edit metrics as torchmetrics: token accuracy, exact match, target perplexity, forgetting."""

from __future__ import annotations

import re
import string

import torch
from torch import Tensor
from torchmetrics import Metric


def per_request_mean(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Mean of `values` grouped by `rows` (the request each value belongs to)."""
    sums = torch.zeros(num_rows, dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())
    counts = torch.bincount(rows, minlength=num_rows).clamp(min=1)
    return sums / counts


def per_request_score(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Per request, the mean of its `values`; NaN for a request with none (a request with an empty locality
    answer has no score, rather than a score of 0)."""
    counts = torch.bincount(rows, minlength=num_rows)
    return per_request_mean(values, rows, num_rows).masked_fill(counts == 0, float("nan"))


class TokenAccuracy(Metric):
    """Share of scored positions where `preds` equals `target`, averaged per request, then over requests.

    Reliability and generalization compare predictions with the target tokens; locality compares
    them with the unedited model's predictions. Requests without scored positions are left out.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("requests", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, rows: Tensor) -> None:
        num_rows = int(rows.max()) + 1 if rows.numel() else 0
        scores = per_request_score((preds == target).double(), rows, num_rows)
        scored = ~scores.isnan()
        self.score_sum += scores[scored].sum()
        self.requests += scored.sum()

    def compute(self) -> Tensor:
        return self.score_sum / self.requests


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class ExactMatch(Metric):
    """Share of requests whose greedily generated answer equals the target after normalisation."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, generated: list[str], targets: list[str]) -> None:
        pairs = zip(generated, targets, strict=True)
        self.correct += sum(self.matches(normalize_answer(g), normalize_answer(t)) for g, t in pairs)
        self.total += len(targets)

    @staticmethod
    def matches(generated: str, target: str) -> bool:
        return generated == target

    def compute(self) -> Tensor:
        return self.correct.double() / self.total


class AnswerMatch(ExactMatch):
    """Share of requests whose generated answer starts with the target, both normalised (an answer may go on)."""

    @staticmethod
    def matches(generated: str, target: str) -> bool:
        return generated.startswith(target)


class TargetPerplexity(Metric):
    """Perplexity of the target given the prompt (lower is better): the exponential of the mean over requests of
    each request's mean token NLL, i.e. the geometric mean of the per-request perplexities, so that one
    unrouted request cannot push it into the millions as an arithmetic mean would."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("requests", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, token_nll: Tensor, rows: Tensor) -> None:
        num_rows = int(rows.max()) + 1 if rows.numel() else 0
        self.nll_sum += per_request_mean(token_nll, rows, num_rows).sum()
        self.requests += num_rows

    def compute(self) -> Tensor:
        return (self.nll_sum / self.requests).exp()


class Forgetting(Metric):
    """Per request, the best score seen so far minus the current one; the mean over requests seen.

    Call `update` after each re-evaluation of the stream with the requests' indices and scores;
    do not reset between evaluations.
    """

    full_state_update = True

    def __init__(self, num_requests: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("best", torch.zeros(num_requests, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("current", torch.zeros(num_requests, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("seen", torch.zeros(num_requests, dtype=torch.bool), dist_reduce_fx="max")

    def update(self, indices: Tensor, scores: Tensor) -> None:
        scores = scores.to(self.current)
        self.current[indices] = scores
        self.best[indices] = torch.maximum(torch.where(self.seen[indices], self.best[indices], scores), scores)
        self.seen[indices] = True

    def compute(self) -> Tensor:
        return (self.best - self.current)[self.seen].mean()
