"""DEFER (the deferral baseline of the GRACE paper): a learned classifier decides per sequence
whether an edited side copy of one layer or the original layer answers.

The side copy is FT's task vector (trained the same way, see `FineTune`); the classifier is a
logistic regression on the sequence's mean input activation at that layer (L2-normalised, so its
learning rate does not depend on the model's activation scale).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.editing_forward import CachedForward
from wise_cl.optimisation import optimise
from wise_cl.rows import TeacherForcedBatch
from wise_cl.side_memory import MAIN, SideMemoryLinear
from wise_cl.strategies.finetune import FineTune
from wise_cl.validation import require


def deferral_logits(classifier: Tensor, a: Tensor, token_mask: Tensor | None) -> Tensor:
    """Per sequence, the classifier's logit on the L2-normalised mean of `a` over real tokens.

    `classifier` holds the weights [in] followed by the bias [1]; `a` is [batch, tokens, in].
    """
    if token_mask is None:
        mean = a.mean(1)
    else:
        mask = token_mask.to(a.dtype)[..., None]
        mean = (a * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(mean.float(), dim=-1) @ classifier[:-1] + classifier[-1]


class DeferLinear(SideMemoryLinear):
    """A side-memory adapter whose route is the deferral classifier's: the side copy (`taus[0]`)
    answers a sequence when the classifier's probability exceeds 0.5, the original layer otherwise."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base)
        self.classifier: Tensor | None = None

    def decide_route(self, a: Tensor, base: Tensor | None = None) -> Tensor:
        if self.classifier is None or not self.taus:
            return super().decide_route(a, base)
        mask = self.token_mask if self.token_mask is not None and self.token_mask.shape == a.shape[:2] else None
        logits = deferral_logits(self.classifier, a, mask)
        return torch.where(logits > 0, 0, MAIN)


class DEFER(FineTune):
    """DEFER: FT's side copy of the layer, used only for sequences a learned classifier defers to it.

    Each experience trains the side copy on the edit rows (as `FineTune`), then the classifier with
    binary cross-entropy: the edit rows (prompt + target) are positive, their irrelevant texts
    negative. Both keep training across the stream from where the last experience left them.

    Args:
        classifier_lr: SGD learning rate of the classifier.
        classifier_steps: classifier optimisation steps per experience at most.
        classifier_stop_loss: stop the classifier's loop once its loss is below this.
        **kwargs: the arguments of `FineTune` (the side copy's training).
    """

    name = "defer"
    adapter_cls = DeferLinear

    def __init__(
        self,
        classifier_lr: float = 5.0,
        classifier_steps: int = 100,
        classifier_stop_loss: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require(classifier_lr > 0, "classifier_lr", "positive", classifier_lr)
        require(classifier_steps >= 1, "classifier_steps", "at least 1", classifier_steps)
        self.classifier_lr, self.classifier_steps = classifier_lr, classifier_steps
        self.classifier_stop_loss = classifier_stop_loss

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.classifier = self.adapter.weight.new_zeros(self.adapter.weight.shape[1] + 1, dtype=torch.float32)

    def after_training(self, forward: CachedForward, rows: TeacherForcedBatch, n_edit: int) -> None:
        """Train the classifier: edit rows positive, irrelevant rows negative."""
        labels = (torch.arange(len(rows.input_ids), device=rows.input_ids.device) < n_edit).float()
        activation, mask = forward.full_activation().detach(), rows.attention_mask
        classifier = self.classifier.clone().requires_grad_(True)

        def loss_fn(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
            return {"loss": F.binary_cross_entropy_with_logits(logits, targets)}

        self.classifier_stats = optimise(
            lambda w: (deferral_logits(w, activation, mask), labels),
            classifier,
            loss_fn,
            self.classifier_lr,
            self.classifier_steps,
            self.classifier_stop_loss,
        )
        self.classifier = classifier.detach()

    def edit(self, batch: EditBatch) -> dict[str, float]:
        stats = super().edit(batch)
        classifier = self.classifier_stats
        return {**stats, "classifier_loss": classifier["loss"], "classifier_steps": classifier["steps"]}

    def publish(self) -> None:
        super().publish()
        self.adapter.classifier = self.classifier

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classifier_norm": float(self.classifier.norm())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "classifier": self.classifier.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier = state["classifier"].to(self.adapter.weight.device)
        super().load_state_dict(state)
