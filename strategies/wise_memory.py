"""WISE's side memory over an edit stream: knowledge shards in random subspaces, their merge into one
memory, and WISE-Retrieve's frozen memories; which task vectors serve, and the threshold of each.

This module keeps the books only. Training (the edit, consolidation, retraining after a merge) is the
strategy's (`wise_cl.strategies.wise`), which tells the memory the scores its edits reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from wise_cl.editing_forward import project_out
from wise_cl.merging import merge_task_vectors


class Edit(NamedTuple):
    """An edit a memory holds: its index in the stream, its prompt and its target."""

    index: int
    prompt: str
    target: str


@dataclass
class Memory:
    """A side memory that serves: its task vector, the smallest activation score among the edits it
    holds, and the floor its threshold keeps above (-inf without calibration texts)."""

    tau: Tensor
    min_score: float
    floor: float

    def threshold(self, act_ratio: float) -> float:
        return max(act_ratio * self.min_score, self.floor)


class ShardedMemory:
    """The side memory under edit, and the frozen ones before it.

    The open shard's task vector `tau` trains inside a random mask (`mask_ratio` of the entries, a new mask per
    shard); after `edits_per_shard` edits it closes, and after `shards_per_merge` closed shards they are merged
    (with the earlier merge) into `merged`. WISE-Retrieve freezes `merged` once the memory is full (the
    strategy's `merges_per_memory`) and starts an empty memory. Served: the frozen memories, the closed part
    (merge of what is closed) and the open shard, each routed on its own; the open shard joins the merge only
    when its group is complete, as in the paper's code. With `shard_routers` each closed shard is also kept as
    it closed, to route (on its own scores and threshold) to the merged memory, which then answers for all of
    them.

    Args:
        like: the main memory's weight (shape, dtype and device of every task vector).
        basis: input directions every served memory is blind to (`project_out`), or None.
        floor: a served task vector's threshold floor (its scores on held-back irrelevant texts).
        seed: seed of the shard masks and of the merges' random choices.
    """

    def __init__(
        self,
        like: Tensor,
        edits_per_shard: int,
        shards_per_merge: int,
        mask_ratio: float,
        merge_method: str,
        merge_density: float,
        prior_merge_weight: float,
        basis: Tensor | None,
        floor: Callable[[Tensor], float],
        seed: int,
        shard_routers: bool = False,
    ) -> None:
        self.edits_per_shard, self.shards_per_merge, self.mask_ratio = edits_per_shard, shards_per_merge, mask_ratio
        self.merge_method, self.merge_density = merge_method, merge_density
        self.prior_merge_weight, self.basis, self.floor, self.seed = prior_merge_weight, basis, floor, seed
        self.tau = torch.zeros_like(like, requires_grad=True)  # the open shard
        self.shards: list[Tensor] = []  # closed shards of the current memory, not merged yet
        self.merged: Tensor | None = None  # merge of the current memory's earlier groups
        self.frozen: list[Memory] = []  # WISE-Retrieve: finished memories
        self.shard_routers = shard_routers
        self.routers: list[Memory] = []  # the closed shards as they closed (`shard_routers`)
        self.closed_min_score = math.inf  # smallest score among the edits of the memory's closed shards
        self.shard_min_score = math.inf  # smallest score among the open shard's edits
        self.shard_edits: list[Edit] = []
        self.edits: list[Edit] = []  # the current memory's edits (closed shards and open shard)
        self.replay_prompts: list[str] = []  # prompts of the edits the frozen memories (or shard routers) hold
        self.shard_index = 0
        self.mask = self.shard_mask(0)

    def shard_mask(self, index: int) -> Tensor:
        """The random subspace of shard `index`: 1 where its task vector may change."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        mask = torch.rand(self.tau.shape, generator=generator) < self.mask_ratio
        return mask.to(self.tau.device, self.tau.dtype)

    def subspace_overlap(self) -> float | None:
        """Of the entries one shard of a merge group may change, the share another shard of the group may
        change too (mean over ordered pairs of the first group's masks; about `mask_ratio` for random masks);
        None with one shard per merge."""
        k = self.shards_per_merge
        if k < 2:
            return None
        masks = [self.shard_mask(i).bool() for i in range(k)]
        shares = [(masks[i] & masks[j]).sum() / masks[i].sum() for i in range(k) for j in range(k) if i != j]
        return float(torch.stack(shares).mean())

    @property
    def min_score(self) -> float:
        """The smallest edit score the current memory holds (closed shards and open shard)."""
        return min(self.closed_min_score, self.shard_min_score)

    def add(self, edits: list[Edit], shard_min_score: float) -> None:
        """The open shard now holds `edits` too, and its edits' smallest score is `shard_min_score`."""
        self.edits += edits
        self.shard_edits += edits
        self.shard_min_score = shard_min_score

    def shard_full(self) -> bool:
        return len(self.shard_edits) >= self.edits_per_shard

    def group_full(self) -> bool:
        return len(self.shards) >= self.shards_per_merge

    def close_shard(self) -> None:
        """Keep the open shard for merging (and as a router); the next edits train a new random subspace from zero."""
        self.shards.append(self.tau.detach().clone())
        if self.shard_routers:
            router = project_out(self.shards[-1], self.basis)
            self.routers.append(Memory(router, self.shard_min_score, self.floor(router)))
            self.replay_prompts += [edit.prompt for edit in self.shard_edits]
        self.closed_min_score, self.shard_min_score, self.shard_edits = self.min_score, math.inf, []
        self.shard_index += 1
        self.mask = self.shard_mask(self.shard_index)
        with torch.no_grad():
            self.tau.zero_()

    def merge(self) -> None:
        """Merge the closed shards (and the earlier merge) into `merged`."""
        self.merged, self.shards = self.closed_part(), []

    def spawn(self) -> None:
        """WISE-Retrieve: freeze the merged memory with its threshold and start an empty one."""
        frozen = project_out(self.merged, self.basis)
        self.frozen.append(Memory(frozen, self.min_score, self.floor(frozen)))
        self.merged, self.closed_min_score, self.shard_min_score = None, math.inf, math.inf
        self.replay_prompts += [edit.prompt for edit in self.edits]
        self.edits = []

    def closed_part(self) -> Tensor | None:
        """The merged memory with the closed shards merged in (None before the first shard closes)."""
        if self.merged is None and len(self.shards) <= 1:
            return self.shards[0].clone() if self.shards else None
        taus = ([self.merged] if self.merged is not None else []) + self.shards
        weights = ([self.prior_merge_weight] if self.merged is not None else []) + [1.0] * len(self.shards)
        return merge_task_vectors(
            taus, self.merge_method, self.merge_density, weights, seed=self.seed + self.shard_index
        )

    def serving(self) -> tuple[list[Memory], list[int] | None]:
        """The memories that serve: the frozen ones, the current memory's closed part and its open shard; and,
        with shard routers, which memory answers for each (None: each for itself). The routers stand in for the
        closed part, which comes last and only answers (its smallest score, and so its threshold, is inf)."""
        memories = list(self.frozen)
        closed = self.closed_part()
        routed = bool(self.routers) and closed is not None
        if routed:
            memories += self.routers
        parts = [] if routed else [(closed, self.closed_min_score)]
        parts += [(self.tau.detach().clone(), self.shard_min_score)] if self.shard_edits else []
        for tau, score in parts:
            if tau is not None:
                tau = project_out(tau, self.basis)
                memories.append(Memory(tau, score, self.floor(tau)))
        if not routed:
            return memories, None
        first, merged = len(self.frozen), len(memories)
        answers = [merged if first <= i < first + len(self.routers) else i for i in range(merged)]
        return memories + [Memory(project_out(closed, self.basis), math.inf, -math.inf)], answers + [merged]

    def state_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau.detach().clone(),
            "shards": list(self.shards),
            "merged": self.merged,
            "frozen": [memory.tau for memory in self.frozen],
            "frozen_min_scores": [memory.min_score for memory in self.frozen],
            "routers": [router.tau for router in self.routers],
            "router_min_scores": [router.min_score for router in self.routers],
            "closed_min_score": self.closed_min_score,
            "shard_min_score": self.shard_min_score,
            "shard_edits": [tuple(edit) for edit in self.shard_edits],
            "memory_edits": [tuple(edit) for edit in self.edits],
            "replay_prompts": list(self.replay_prompts),
            "shard_index": self.shard_index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.tau.copy_(state["tau"])
        self.shards, self.merged = list(state["shards"]), state["merged"]
        self.frozen = [
            Memory(tau, score, self.floor(tau))
            for tau, score in zip(state["frozen"], state["frozen_min_scores"], strict=True)
        ]
        self.routers = [  # absent from checkpoints made before shard routers: none
            Memory(tau, score, self.floor(tau))
            for tau, score in zip(state.get("routers", []), state.get("router_min_scores", []), strict=True)
        ]
        self.closed_min_score, self.shard_min_score = state["closed_min_score"], state["shard_min_score"]
        self.shard_edits = [Edit(*edit) for edit in state["shard_edits"]]
        self.edits = [Edit(*edit) for edit in state["memory_edits"]]
        self.replay_prompts = list(state["replay_prompts"])
        self.shard_index = state["shard_index"]
        self.mask = self.shard_mask(self.shard_index)
