"""The WISE side memory: an adapter around one Linear layer with per-sequence activation routing.

Each side memory is stored as a task vector tau = W' - W, so the side output is
`W a + tau a` and the activation score of a sequence is the mean over its real tokens of
`||tau a_t||_2` (the paper's Eq. 3), or, with `score_activation` set to the model's activation
function, of `||act(W a_t + tau a_t) - act(W a_t)||_2` (the paper's official code).

With many memories the route can be decided in two stages (`use_sketch`): every memory is scored on a random
projection of its output (`S tau a`, S of `sketch_dim` rows: `||S x||` estimates `||x||`), and only each
sequence's `candidates` best are scored exactly, so routing costs `sketch_dim` instead of `out_features`
rows per memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.activations import ACT2FN

from wise_cl.models import find_module, replace_module

MAIN = -1  # route index of the main memory


def route(scores: Tensor, thresholds: Tensor, answers: list[int] | None = None) -> Tensor:
    """Per sequence, the index of the highest-scoring memory if its score exceeds that memory's threshold,
    else MAIN; from scores [memories, batch] and thresholds [memories]. With `answers` (per memory, the memory
    that answers for it) the memory that passes its threshold by the largest factor routes, to its answer."""
    if answers is not None:
        factors = (scores / thresholds[:, None]).nan_to_num(nan=-torch.inf)  # -inf (not scored) / inf: NaN
        index = route(factors, torch.ones_like(thresholds))
        answering = torch.tensor(answers, device=index.device)
        return torch.where(index == MAIN, index, answering[index.clamp(min=0)])
    best, index = scores.max(0)
    return torch.where(best > thresholds[index], index, torch.full_like(index, MAIN))


def names_each_memory(answers: list[int] | None, memories: int) -> bool:
    """Whether `answers` (None, or one memory index per memory) is a valid `answers` list for `memories`."""
    if answers is None:
        return True
    return len(answers) == memories and all(isinstance(i, int) and 0 <= i < memories for i in answers)


def output_distances(delta: Tensor, base: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Per token, the distance between the side output `base + delta` and the main output `base`:
    `||delta||`, or `||act(base + delta) - act(base)||` with the name of an activation function."""
    if activation is None:
        return delta.norm(dim=-1)
    act = ACT2FN[activation]
    return (act(base + delta) - act(base)).norm(dim=-1)


def sequence_scores(distances: Tensor, token_mask: Tensor | None) -> Tensor:
    """Per sequence, the mean over real tokens (`token_mask`) of the per-token `distances` ([batch, tokens])."""
    if token_mask is None:
        return distances.mean(-1)
    mask = token_mask.to(distances.dtype)
    return (distances * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class SideMemoryLinear(nn.Module):
    """A frozen Linear (the main memory) plus side memories that answer the sequences routed to them.

    `taus` and `thresholds` hold the side memories that serve; a sequence goes to the memory with
    the highest activation score when that score exceeds the memory's threshold, else to the main
    memory. The route is decided once per sequence (per prompt during generation) and kept; with
    `reroute_each_token` every generated token is routed again on itself alone (the paper's code).
    With `route_on_prompt`, a teacher-forced sequence is scored on its prompt tokens alone (see `prompt_tokens`),
    as generation, which decides on the prompt, sees it.
    Inside `with adapter.trained_with(tau)` every row uses `tau` instead (the editing forward).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.taus: list[Tensor] = []
        self.thresholds: list[float] = []
        self.answers: list[int] | None = None  # per memory, the memory answering for it (None: itself)
        self.train_tau: Tensor | None = None
        self.token_mask: Tensor | None = None
        self.keep_route = False
        self.route: Tensor | None = None
        self.route_on_prompt = False
        self.prompt_mask: Tensor | None = None
        self.reroute_each_token = False
        self.score_activation: str | None = None  # activation function around the outputs of a score
        self.sketch_dim, self.candidates = 0, 1  # two-stage routing off
        self.sketches: Tensor | None = None  # [memories * sketch_dim, in_features]: S tau of every memory
        self._sketched: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (id, version) -> (tau, S tau)

    def distances(self, a: Tensor, tau: Tensor, base: Tensor | None = None) -> Tensor:
        """Per token, the distance between the output of `W + tau` and of `W` (`base`: `W a`, if known)."""
        if self.score_activation is not None and base is None:
            base = self.base(a)
        return output_distances(F.linear(a, tau), base, self.score_activation)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @contextmanager
    def trained_with(self, tau: Tensor) -> Iterator[None]:
        """Within the block every sequence is answered by `W + tau`, unrouted (a task vector being trained)."""
        self.train_tau = tau
        try:
            yield
        finally:
            self.train_tau = None

    def serve(self, taus: list[Tensor], thresholds: list[float], answers: list[int] | None = None) -> None:
        """Answer with these side memories from now on, each above its threshold. `answers`: per memory, the
        index of the memory whose task vector answers the sequences routed to it (WISE-Merge's shard routers
        answer with the merged memory, which only answers: its threshold is inf); see `route`."""
        if len(taus) != len(thresholds):
            raise ValueError(f"{len(taus)} side memories but {len(thresholds)} thresholds")
        if not names_each_memory(answers, len(taus)):
            raise ValueError(f"answers {answers!r} do not name one of the {len(taus)} side memories for each")
        self.taus, self.thresholds = list(taus), list(thresholds)
        self.answers = list(answers) if answers is not None else None
        self._sketch()

    def use_sketch(self, sketch_dim: int, candidates: int) -> None:
        """Route in two stages: all memories on a `sketch_dim`-row random projection of their output, then
        each sequence's `candidates` best exactly (0: every memory exactly, as in the paper)."""
        if sketch_dim < 0 or candidates < 1:
            raise ValueError(f"sketch_dim must be >= 0 and candidates >= 1, got {sketch_dim} and {candidates}")
        self.sketch_dim, self.candidates, self._sketched = sketch_dim, candidates, {}
        self._sketch()

    def _sketch(self) -> None:
        """Stack `S tau` for the serving memories (None when every memory is scored exactly anyway), and mark the
        memories that only answer (threshold inf), which the sketch never makes candidates."""
        if not self.sketch_dim or len(self.taus) <= self.candidates:
            self.sketches = None
            return
        weight = self.base.weight
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(self.sketch_dim, weight.shape[0], generator=generator) / self.sketch_dim**0.5
        projection = projection.to(weight)
        self.only_answers = torch.tensor(self.thresholds).isposinf().to(weight.device)
        known, self._sketched, sketches = self._sketched, {}, []
        for tau in self.taus:  # a memory served before and unchanged since (a frozen one) is not projected again
            key = (id(tau), tau._version)
            self._sketched[key] = known.get(key) or (tau, projection @ tau)
            sketches.append(self._sketched[key][1])
        self.sketches = torch.cat(sketches)

    def score_mask(self, a: Tensor) -> Tensor | None:
        """The tokens a sequence's score averages over: its prompt (`route_on_prompt`) or all its real ones."""
        mask = self.prompt_mask if self.route_on_prompt and self.prompt_mask is not None else self.token_mask
        return mask if mask is not None and mask.shape == a.shape[:2] else None

    def scores(self, a: Tensor, base: Tensor | None = None) -> Tensor:
        """Activation score of every sequence on every serving memory: [memories, batch]."""
        mask = self.score_mask(a)
        return torch.stack([sequence_scores(self.distances(a, tau, base), mask) for tau in self.taus])

    def candidate_scores(self, a: Tensor, base: Tensor | None = None) -> Tensor:
        """`scores` where the sketch ranks a memory among a sequence's `candidates` best; -inf elsewhere."""
        mask = self.score_mask(a)
        sketched = F.linear(a, self.sketches).unflatten(-1, (len(self.taus), self.sketch_dim)).norm(dim=-1)
        rough = sequence_scores(sketched.permute(2, 0, 1), mask)  # [memories, batch]
        rough = rough.masked_fill(self.only_answers[:, None], -torch.inf)  # never routed on their scores
        chosen = rough.topk(self.candidates, dim=0).indices
        scores = torch.full_like(rough, -torch.inf)
        for memory in chosen.unique().tolist():
            rows = (chosen == memory).any(0)
            part = None if base is None else base[rows]
            distances = self.distances(a[rows], self.taus[memory], part)
            scores[memory, rows] = sequence_scores(distances, None if mask is None else mask[rows]).to(scores)
        return scores

    def decide_route(self, a: Tensor, base: Tensor | None = None) -> Tensor:
        """Per sequence, the index of the side memory that answers, or MAIN."""
        if not self.taus:
            return torch.full((a.shape[0],), MAIN, dtype=torch.long, device=a.device)
        scores = self.scores(a, base) if self.sketches is None else self.candidate_scores(a, base)
        thresholds = torch.tensor(self.thresholds, dtype=scores.dtype, device=a.device)
        return route(scores, thresholds, self.answers)

    def forward(self, a: Tensor) -> Tensor:
        out = self.base(a)
        if self.train_tau is not None:
            return out + F.linear(a, self.train_tau)
        if not (self.keep_route and self.route is not None and self.route.shape[0] == a.shape[0]):
            self.route = self.decide_route(a, out)
        for m in self.route.unique().tolist():  # the memories that answer some sequence, not all that serve
            if m != MAIN:
                rows = self.route == m
                out = out.index_add(0, rows.nonzero().squeeze(1), F.linear(a[rows], self.taus[m]))
        return out


@contextmanager
def prompt_tokens(model: nn.Module, mask: Tensor) -> Iterator[None]:
    """Within the block the model's side-memory adapters know which tokens of the batch are its prompts
    (`mask`, [batch, tokens]); those that route on the prompt score those alone."""
    adapters = [module for module in model.modules() if isinstance(module, SideMemoryLinear)]
    for adapter in adapters:
        adapter.prompt_mask = mask
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.prompt_mask = None


def _routing_context_hook(adapter: SideMemoryLinear):
    """Forward pre-hook for the decoder: hands the attention mask to the adapter and tells it
    whether this forward continues a cached sequence (generation), so the route is kept."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continued = cache is not None and cache.get_seq_length() > 0
        adapter.keep_route = continued and not adapter.reroute_each_token
        if not adapter.keep_route:
            adapter.token_mask = kwargs.get("attention_mask")

    return hook


def attach_side_memory(
    model: nn.Module, path: str, adapter_cls: type[SideMemoryLinear] = SideMemoryLinear
) -> SideMemoryLinear:
    """Wrap the Linear at `path` in place with a side-memory adapter and return the adapter.

    `adapter_cls` picks a subclass with another route decision or output (other editing methods).
    """
    base = find_module(model, path)
    if isinstance(base, adapter_cls):
        return base
    if not isinstance(base, nn.Linear):
        raise TypeError(f"'{path}' is a {type(base).__name__}; the side memory wraps an nn.Linear")
    adapter = adapter_cls(base)
    replace_module(model, path, adapter)
    decoder = getattr(model, "base_model", model)
    adapter._hook = decoder.register_forward_pre_hook(_routing_context_hook(adapter), with_kwargs=True)
    return adapter


def detach_side_memory(model: nn.Module, path: str) -> nn.Linear:
    """Put the original Linear back at `path`; the model computes exactly as before attaching."""
    adapter = find_module(model, path)
    if not isinstance(adapter, SideMemoryLinear):
        raise TypeError(f"'{path}' holds no side memory")
    adapter._hook.remove()
    replace_module(model, path, adapter.base)
    return adapter.base


def save_side_memories(adapter: SideMemoryLinear, path: str | Path, layer: str) -> None:
    """Write only the serving side memories (task vectors and thresholds) to a safetensors file."""
    tensors = {f"tau.{i}": tau.detach().contiguous().cpu() for i, tau in enumerate(adapter.taus)}
    metadata = {"layer": layer, "thresholds": json.dumps(adapter.thresholds)}
    metadata["route_on"] = "prompt" if adapter.route_on_prompt else "sequence"
    metadata["reroute_each_token"] = json.dumps(adapter.reroute_each_token)
    metadata["score_activation"] = json.dumps(adapter.score_activation)
    metadata["sketch"] = json.dumps([adapter.sketch_dim, adapter.candidates])
    metadata["answers"] = json.dumps(adapter.answers)
    save_file(tensors, str(path), metadata=metadata)


def load_side_memories(model: nn.Module, path: str | Path) -> SideMemoryLinear:
    """Attach the side memories saved by `save_side_memories` to a freshly loaded base model."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            taus = [f.get_tensor(f"tau.{i}") for i in range(len(f.keys()))]
        thresholds = json.loads(metadata["thresholds"])
        layer = metadata["layer"]
        # files from before these options route on the whole sequence, keep the route, score without activation
        route_on = metadata.get("route_on", "sequence")
        reroute_each_token = json.loads(metadata.get("reroute_each_token", "false"))
        score_activation = json.loads(metadata.get("score_activation", "null"))
        sketch_dim, candidates = json.loads(metadata.get("sketch", "[0, 1]"))
        answers = json.loads(metadata.get("answers", "null"))
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path}: not a side-memory file written by save_side_memories ({error})") from None
    if len(thresholds) != len(taus) or not all(isinstance(t, (int, float)) for t in thresholds):
        raise ValueError(f"{path}: {len(taus)} side memories but thresholds {thresholds!r}")
    if score_activation is not None and score_activation not in ACT2FN:
        raise ValueError(f"{path}: score_activation '{score_activation}' is no activation function transformers knows")
    if not names_each_memory(answers, len(taus)):
        raise ValueError(f"{path}: answers {answers!r} do not name one of the {len(taus)} side memories for each")
    weight = find_module(model, layer).weight
    for i, tau in enumerate(taus):
        if tau.shape != weight.shape or not torch.isfinite(tau).all():
            raise ValueError(f"{path}: tau.{i} is not a finite {tuple(weight.shape)} matrix for layer '{layer}'")
    adapter = attach_side_memory(model, layer)
    adapter.use_sketch(sketch_dim, candidates)
    adapter.serve([tau.to(adapter.weight) for tau in taus], thresholds, answers)
    adapter.route_on_prompt = route_on == "prompt"
    adapter.reroute_each_token, adapter.score_activation = bool(reroute_each_token), score_activation
    return adapter
