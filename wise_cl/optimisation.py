"""The editing methods' optimisation loop and their editing loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from wise_cl.metrics import per_request_mean
from wise_cl.rows import TeacherForcedBatch

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def optimise(
    forward: Callable[[Tensor], tuple[Tensor, Tensor]],
    param: Tensor,
    loss_fn: Callable[[Tensor, Tensor], dict[str, Tensor]],
    lr: float,
    n_iter: int,
    early_stop_loss: float = 0.0,
    grad_mask: Tensor | None = None,
    stop_on: str = "loss",
    bound: float = 0.0,
    optimizer: str = "sgd",
) -> dict[str, float]:
    """Plain SGD (or Adam, `optimizer="adam"`) on `param` for at most `n_iter` steps on
    `loss_fn(*forward(param))["loss"]`, stopping once the term named `stop_on` is below `early_stop_loss`;
    the gradient is multiplied by `grad_mask` so nothing outside it moves, and with a `bound` every entry is
    clamped to [-bound, bound] after each step."""
    opt = OPTIMIZERS[optimizer]([param], lr=lr)
    steps = 0
    while steps < n_iter:
        steps += 1
        losses = loss_fn(*forward(param))
        if losses[stop_on].item() < early_stop_loss:
            break
        opt.zero_grad()
        losses["loss"].backward()
        if grad_mask is not None:
            param.grad.mul_(grad_mask)
        opt.step()
        if bound:
            with torch.no_grad():
                param.clamp_(-bound, bound)
    return {**{name: value.item() for name, value in losses.items()}, "steps": steps}


def edit_nll(logits: Tensor, rows: TeacherForcedBatch, n_edit: int) -> Tensor:
    """Per edit row (the first `n_edit` rows), the mean NLL of its target tokens; logits at `rows.scored`."""
    labels, row_ids = rows.labels, rows.rows
    edit = row_ids < n_edit
    if not edit.all():  # other rows have targets too (no copy of the logits in the usual case)
        logits, labels, row_ids = logits[edit], labels[edit], row_ids[edit]
    return per_request_mean(F.cross_entropy(logits.float(), labels, reduction="none"), row_ids, n_edit)


def prompt_last_nll(logits: Tensor, rows: TeacherForcedBatch, n_edit: int) -> Tensor:
    """Per edit row, the mean NLL of its target tokens all scored at the prompt's last token (ROME's FT-L
    objective, EasyEdit's `prompt_last`: one next-token distribution asked for the whole answer)."""
    labels, row_ids = rows.labels, rows.rows
    edit = row_ids < n_edit
    logits, labels, row_ids = logits[edit], labels[edit], row_ids[edit]
    at_prompt_end = logits[torch.searchsorted(row_ids, row_ids)]  # each row's first scored position
    return per_request_mean(F.cross_entropy(at_prompt_end.float(), labels, reduction="none"), row_ids, n_edit)
