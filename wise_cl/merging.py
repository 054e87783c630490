"""Merge task vectors (tau = W' - W) into one: linear, Ties, DARE and DARE-Ties (after mergekit's GTA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MERGE_METHODS = ("ties", "linear", "dare", "dare_ties")


def trim_to_density(tau: Tensor, density: float) -> Tensor:
    """Keep the `density` share of entries with the largest magnitude, zero the rest."""
    keep = int(round(density * tau.numel()))
    if keep >= tau.numel():
        return tau
    if keep == 0:
        return torch.zeros_like(tau)
    threshold = tau.abs().flatten().kthvalue(tau.numel() - keep).values
    return tau * (tau.abs() > threshold)


def drop_and_rescale(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density` and rescale the kept ones by 1 / density."""
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) < density
    return tau * keep / density


def elect_sign(taus: Tensor, weights: Tensor) -> Tensor:
    """Per entry, the sign of the weighted sum over task vectors."""
    return torch.sign((taus * weights).sum(0))


def disjoint_mean(taus: Tensor, weights: Tensor, sign: Tensor) -> Tensor:
    """Weighted mean over only the task vectors that agree with the elected sign."""
    agree = (torch.sign(taus) == sign) & (taus != 0)
    total = (taus * weights * agree).sum(0)
    norm = (weights * agree).sum(0)
    return torch.where(norm > 0, total / norm.clamp(min=1e-12), torch.zeros_like(total))


def merge_task_vectors(
    taus: Sequence[Tensor],
    method: str = "ties",
    density: float = 0.5,
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> Tensor:
    """Merge task vectors with `method`; `weights` (default all 1) favour some, e.g. an earlier merge."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}'; expected one of {MERGE_METHODS}")
    stacked = torch.stack(list(taus))
    w = torch.tensor(weights if weights is not None else [1.0] * len(taus), dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    if method == "linear":
        return (stacked * w).sum(0) / w.sum()
    if method in ("dare", "dare_ties"):
        generator = torch.Generator(device=stacked.device).manual_seed(seed)
        stacked = torch.stack([drop_and_rescale(t, density, generator) for t in stacked])
        if method == "dare":
            return (stacked * w).sum(0) / w.sum()
    else:
        stacked = torch.stack([trim_to_density(t, density) for t in stacked])
    return disjoint_mean(stacked, w, elect_sign(stacked, w))
