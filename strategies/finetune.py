"""FT-L and FT-EWC: fine-tune one FFN projection on the edits, optionally with EWC across the stream.

Fine-tuning is served as a side memory without a router: the change to the weight is a task
vector `tau` (W' = W + tau) that `SideMemoryLinear` adds for every sequence (threshold -inf).
The base weight is never written, so `detach` gives back the unedited model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.editing_forward import CachedForward
from wise_cl.optimisation import OPTIMIZERS, edit_nll, optimise, prompt_last_nll
from wise_cl.rows import TeacherForcedBatch, teacher_forced_batch
from wise_cl.strategies.base import LinearEditStrategy
from wise_cl.validation import require, require_choice

OBJECTIVES = {"target": edit_nll, "prompt_last": prompt_last_nll}


def split_in_halves(text: str) -> tuple[str, str]:
    """A text as (prompt, answer): its first half of words, then the rest (at least one word each side)."""
    words = text.split()
    half = max(1, len(words) // 2)
    return " ".join(words[:half]), " ".join(words[half:])


class EWCPenalty:
    """Online Elastic Weight Consolidation on one tensor.

    After each experience `consolidate` folds that experience's diagonal Fisher into the running
    one (`F = decay * F + F_new`) and anchors at the weights reached; later experiences pay
    `ewc_lambda / 2 * sum(F * (theta - anchor)^2)`. `max_curvature` caps `ewc_lambda * F` per
    entry: at `1 / lr` one SGD step on the penalty alone moves an entry at most back to its anchor,
    so a large Fisher entry pins it instead of making plain SGD diverge.
    """

    def __init__(self, ewc_lambda: float, decay: float = 1.0, max_curvature: float = math.inf) -> None:
        self.ewc_lambda, self.decay, self.max_curvature = ewc_lambda, decay, max_curvature
        self.fisher: Tensor | None = None
        self.anchor: Tensor | None = None

    def __call__(self, theta: Tensor) -> Tensor:
        if self.fisher is None:
            return theta.new_zeros(())
        curvature = (self.ewc_lambda * self.fisher).clamp(max=self.max_curvature)
        return (curvature * (theta - self.anchor).pow(2)).sum() / 2

    def consolidate(self, theta: Tensor, fisher: Tensor) -> None:
        self.fisher = fisher if self.fisher is None else self.decay * self.fisher + fisher
        self.anchor = theta.detach().clone()

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        self.fisher, self.anchor = state["fisher"], state["anchor"]


class FineTune(LinearEditStrategy):
    """FT-L: fine-tune one Linear layer on each experience's edits, with a KL term on unrelated text.

    The loss is the target tokens' NLL on the edit rows plus `kl_weight` times
    KL(unedited || edited) of the next-token distributions at the answer positions of the
    irrelevant texts (each is split into a prompt half and an answer half; the unedited
    log-probs come from tau = 0, once per experience). One task vector accumulates all edits;
    each experience continues training it. With `norm_constraint` every entry of the change is clamped
    after each step (the L-infinity bound of FT-L as ROME and EasyEdit define it); 0 leaves it free.
    `objective="prompt_last"` with `optimizer="adam"` and no KL is FT-L as the WISE paper ran it (EasyEdit):
    every target token scored at the prompt's last token.

    Args:
        layer: module path of the Linear that is fine-tuned.
        lr: SGD learning rate on the weight change.
        n_iter: optimisation steps per experience at most.
        early_stop_loss: stop an experience's loop once the loss is below this.
        kl_weight: weight of the KL term on irrelevant text (0: plain fine-tuning).
        irrelevant_source: bundled data set name or JSON list of the irrelevant texts (edit i uses text i).
        norm_constraint: bound on every entry of the weight change, |W' - W| <= bound (0: no bound).
        objective: `target` (each target token's NLL where it is predicted) or `prompt_last` (all of them
            at the prompt's last token).
        optimizer: `sgd` or `adam`.
    """

    name = "ft"

    def __init__(
        self,
        layer: str = "model.layers.25.mlp.down_proj",
        lr: float = 1.0,
        n_iter: int = 70,
        early_stop_loss: float = 0.01,
        kl_weight: float = 1.0,
        irrelevant_source: str = "zsre",
        norm_constraint: float = 0.0,
        objective: str = "target",
        optimizer: str = "sgd",
    ) -> None:
        require(lr > 0, "lr", "positive", lr)
        require(n_iter >= 1, "n_iter", "at least 1", n_iter)
        require(kl_weight >= 0, "kl_weight", "non-negative", kl_weight)
        require(norm_constraint >= 0, "norm_constraint", "non-negative", norm_constraint)
        require_choice(objective, "objective", OBJECTIVES)
        require_choice(optimizer, "optimizer", OPTIMIZERS)
        self.objective, self.optimizer = objective, optimizer
        self.layer, self.lr, self.n_iter, self.early_stop_loss = layer, lr, n_iter, early_stop_loss
        self.kl_weight, self.irrelevant_source, self.norm_constraint = kl_weight, irrelevant_source, norm_constraint

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.tau = torch.zeros_like(self.adapter.weight, requires_grad=True)

    # editing ------------------------------------------------------------------------------------

    def edit_rows(self, batch: EditBatch) -> TeacherForcedBatch:
        """The edit rows (prompt + target), then one irrelevant row per edit (scored only for the KL)."""
        irrelevant = [self.irrelevant[i % len(self.irrelevant)] for i in batch.indices]
        halves = [split_in_halves(text) if self.kl_weight > 0 else (text, "") for text in irrelevant]
        prompts = [r.prompt for r in batch.requests] + [prompt for prompt, _ in halves]
        answers = [r.target for r in batch.requests] + [answer for _, answer in halves]
        return teacher_forced_batch(self.tokenizer, prompts, answers).to(self.model.device)

    def edit(self, batch: EditBatch) -> dict[str, float]:
        rows, n_edit = self.edit_rows(batch), len(batch)
        forward = CachedForward(self.model, self.adapter, rows, self.layer)
        unrelated = rows.rows >= n_edit
        reference = None
        if self.kl_weight > 0 and unrelated.any():
            with torch.no_grad():
                reference = forward(torch.zeros_like(self.tau))[0][unrelated].float().log_softmax(-1)

        def loss_fn(logits: Tensor, scores: Tensor) -> dict[str, Tensor]:
            losses = {"edit_loss": self.nll(logits, rows, n_edit).mean()}
            total = losses["edit_loss"]
            if reference is not None:
                current = logits[unrelated].float().log_softmax(-1)
                losses["kl"] = F.kl_div(current, reference, log_target=True, reduction="none").sum(-1).mean()
                total = total + self.kl_weight * losses["kl"]
            for name, penalty in self.penalties().items():
                losses[name], total = penalty, total + penalty
            return {"loss": total, **losses}

        stats = optimise(
            forward,
            self.tau,
            loss_fn,
            self.lr,
            self.n_iter,
            self.early_stop_loss,
            bound=self.norm_constraint,
            optimizer=self.optimizer,
        )
        self.after_training(forward, rows, n_edit)
        self.publish()
        return stats

    def nll(self, logits: Tensor, rows: TeacherForcedBatch, n_edit: int) -> Tensor:
        """Per edit row, the editing objective's NLL."""
        return OBJECTIVES[self.objective](logits, rows, n_edit)

    def penalties(self) -> dict[str, Tensor]:
        """Further loss terms on `tau` (named for the logs); none for plain fine-tuning."""
        return {}

    def after_training(self, forward: CachedForward, rows: TeacherForcedBatch, n_edit: int) -> None:
        """Runs after each experience's optimisation (consolidation, routers)."""

    def publish(self) -> None:
        """Serve the weight change to every sequence: a side memory that always answers."""
        self.adapter.serve([self.tau.detach()], [-math.inf])

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "kl_weight": self.kl_weight, "tau_norm": float(self.tau.detach().norm())}

    # checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.tau.copy_(state["tau"])
        self.publish()


class EWC(FineTune):
    """FT-EWC: fine-tuning plus online Elastic Weight Consolidation across the stream.

    After each experience the diagonal empirical Fisher of the edit NLL with respect to the
    fine-tuned weight (squared per-edit gradients, averaged over the experience's edits) is
    added to the decayed running Fisher, and the weights reached become the anchor; later
    experiences add `ewc_lambda / 2 * sum(F * (W' - anchor)^2)` to their loss, with
    `ewc_lambda * F` capped per entry at `1 / lr` so that plain SGD stays stable (`EWCPenalty`).

    Args:
        ewc_lambda: weight of the EWC penalty (the empirical Fisher at a fitted edit is small:
            about 1e-4 at most per entry on SmolLM2-135M, hence the large default).
        decay: factor on the running Fisher before each experience's is added (1: plain sum).
        **kwargs: the arguments of `FineTune`.
    """

    name = "ewc"

    def __init__(self, ewc_lambda: float = 1e4, decay: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require(ewc_lambda >= 0, "ewc_lambda", "non-negative", ewc_lambda)
        require(0 <= decay <= 1, "decay", "in [0, 1]", decay)
        self.ewc = EWCPenalty(ewc_lambda, decay, max_curvature=1 / self.lr)

    def penalties(self) -> dict[str, Tensor]:
        return {"ewc": self.ewc(self.tau)}

    def after_training(self, forward: CachedForward, rows: TeacherForcedBatch, n_edit: int) -> None:
        self.ewc.consolidate(self.tau, self.fisher(forward, rows, n_edit))

    def fisher(self, forward: CachedForward, rows: TeacherForcedBatch, n_edit: int) -> Tensor:
        """Diagonal empirical Fisher of the edit NLL at the current weights: mean squared per-edit gradient."""
        losses = self.nll(forward(self.tau)[0], rows, n_edit)
        fisher = torch.zeros_like(self.tau)
        for i, loss in enumerate(losses):
            (grad,) = torch.autograd.grad(loss, self.tau, retain_graph=i + 1 < len(losses))
            fisher += grad.pow(2)
        return fisher / n_edit

    def describe(self) -> dict[str, Any]:
        fisher_sum = float(self.ewc.fisher.sum()) if self.ewc.fisher is not None else 0.0
        return {**super().describe(), "ewc_lambda": self.ewc.ewc_lambda, "fisher_sum": fisher_sum}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ewc": self.ewc.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ewc.load_state_dict(state["ewc"])
