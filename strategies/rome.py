"""ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT"): each edit is a rank-one change
to one MLP output projection, computed in closed form.

For an edit with subject s, prompt p and target o:
- the key k is the layer's input at the last token of s in p, averaged over p alone and p after each of a few
  prefixes the model writes itself;
- the value change d is optimised so that adding it to the layer's output at that token makes the model
  answer o after every prefix, while "{s} is a" keeps its next-token distribution (KL term), with weight
  decay and a norm clamp relative to the current output W k;
- W' = W + d (C^-1 k)^T / (k^T C^-1 k), with C = E[k k^T] over a text corpus: W' k = W k + d exactly, and
  the keys least like k (under C) change least.
Edits are applied one after another, each to the weight the earlier ones left. The change is served as a
task vector `tau` = W' - W that answers every sequence, so `detach` gives back the unedited model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.evaluation import scored_logits
from wise_cl.key_statistics import added_to_output, cached_second_moments, captured_inputs
from wise_cl.optimisation import edit_nll
from wise_cl.prefixes import PREFIX_SEEDS, generate_prefixes
from wise_cl.records import EditRequest, read_corpus
from wise_cl.rows import TeacherForcedBatch, teacher_forced_batch
from wise_cl.strategies.base import LinearEditStrategy, mean_stats
from wise_cl.validation import require

RIDGE = 1e-4  # C + RIDGE * mean(diag C) * I: keeps the solve stable where the corpus leaves C nearly singular


def subject_last_token(tokenizer: PreTrainedTokenizerBase, text: str, subject: str | None) -> int:
    """Index of the token holding the last character of `subject`'s last occurrence in `text` (after any prefix;
    the text's last token when there is no subject or it does not occur)."""
    end = text.rfind(subject) + len(subject) if subject and subject in text else len(text)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return max(i for i, (start, stop) in enumerate(offsets) if stop > start and start < end)


class ROME(LinearEditStrategy):
    """ROME: a closed-form rank-one edit of one MLP output projection per request (see the module docstring).

    Args:
        layer: module path of the MLP output projection (LLaMA: `model.layers.<i>.mlp.down_proj`).
        n_iter: Adam steps on the value change, at most.
        lr: Adam learning rate on the value change.
        early_stop_loss: stop once the target NLL (mean over the prefixed prompts) is below this.
        kl_weight: weight of KL(edited || unedited) on the next token after "{subject} is a".
        weight_decay: weight of ||d||^2 / ||W k||^2.
        clamp_norm: ||d|| is kept at most this many times ||W k||.
        num_prefixes: generated prefixes the key and value are averaged over (besides the bare prompt).
        prefix_length: tokens per generated prefix.
        corpus: texts C is measured on: `wikipedia` (bundled, see `read_corpus`) or a JSON list of strings.
        corpus_tokens: tokens per corpus text at most.
        seed: seed of the prefix sampling.
    """

    name = "rome"

    def __init__(
        self,
        layer: str = "model.layers.6.mlp.down_proj",
        n_iter: int = 20,
        lr: float = 0.5,
        early_stop_loss: float = 0.05,
        kl_weight: float = 0.0625,
        weight_decay: float = 0.5,
        clamp_norm: float = 4.0,
        num_prefixes: int = 10,
        prefix_length: int = 10,
        corpus: str = "wikipedia",
        corpus_tokens: int = 128,
        seed: int = 0,
    ) -> None:
        require(n_iter >= 1, "n_iter", "at least 1", n_iter)
        require(lr > 0, "lr", "positive", lr)
        require(kl_weight >= 0, "kl_weight", "non-negative", kl_weight)
        require(weight_decay >= 0, "weight_decay", "non-negative", weight_decay)
        require(clamp_norm > 0, "clamp_norm", "positive", clamp_norm)
        require(0 <= num_prefixes <= len(PREFIX_SEEDS), "num_prefixes", f"in [0, {len(PREFIX_SEEDS)}]", num_prefixes)
        require(prefix_length >= 1, "prefix_length", "at least 1", prefix_length)
        require(corpus_tokens >= 1, "corpus_tokens", "at least 1", corpus_tokens)
        self.layer, self.n_iter, self.lr, self.early_stop_loss = layer, n_iter, lr, early_stop_loss
        self.kl_weight, self.weight_decay, self.clamp_norm = kl_weight, weight_decay, clamp_norm
        self.num_prefixes, self.prefix_length, self.seed = num_prefixes, prefix_length, seed
        self.corpus, self.corpus_tokens = corpus, corpus_tokens

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.measure_keys(model, tokenizer)  # before any adapter: the cache is keyed by the unedited model
        super().prepare(model, tokenizer)
        self.tau = torch.zeros_like(self.adapter.weight)
        self.prefixes: list[str] | None = None
        self.edits = 0

    def measure_keys(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """C^-1 for the edited layer (C from the corpus, cached)."""
        corpus = read_corpus(self.corpus)
        moment = cached_second_moments(model, tokenizer, [self.layer], corpus, self.corpus_tokens)[self.layer]
        self.inverse_moment = torch.linalg.inv(moment + RIDGE * moment.diagonal().mean() * torch.eye(len(moment)))

    # editing ------------------------------------------------------------------------------------

    def edit(self, batch: EditBatch) -> dict[str, float]:
        stats = []
        for request in batch.requests:
            key = self.keys(self.adapter, [request])[0]
            change, request_stats = self.value_change(request, key)
            stats.append(request_stats)
            self.tau += self.rank_one_update(key, change)
            self.edits += 1
            self.publish()
        return mean_stats(stats)

    def prompts(self, request: EditRequest) -> list[str]:
        """The bare prompt, then the prompt after each generated prefix."""
        if self.prefixes is None:
            self.prefixes = generate_prefixes(
                self.model, self.tokenizer, self.num_prefixes, self.prefix_length, self.seed
            )
        return [request.prompt] + [f"{prefix} {request.prompt}" for prefix in self.prefixes]

    def rows_at_subject(
        self, texts: list[str], subjects: list[str | None], answers: list[str]
    ) -> tuple[TeacherForcedBatch, Tensor]:
        """`text + answer` rows, and per row the token of its subject's last character."""
        rows = teacher_forced_batch(self.tokenizer, texts, answers).to(self.model.device)
        at = [subject_last_token(self.tokenizer, text, subject) for text, subject in zip(texts, subjects, strict=True)]
        return rows, torch.tensor(at, device=self.model.device)

    def run(self, rows: TeacherForcedBatch) -> None:
        """Run the decoder on `rows` (for what hooks capture; no logits)."""
        self.model.base_model(
            input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids
        )

    @torch.no_grad()
    def keys(self, module: nn.Module, requests: list[EditRequest]) -> Tensor:
        """Per request, `module`'s input at the subject's last token averaged over its prompts: [requests, in]."""
        texts = [self.prompts(request) for request in requests]
        subjects = [request.subject for request, group in zip(requests, texts, strict=True) for _ in group]
        flat = [text for group in texts for text in group]
        rows, at = self.rows_at_subject(flat, subjects, [""] * len(flat))
        with captured_inputs(module) as inputs:
            self.run(rows)
        per_row = inputs[0][torch.arange(len(flat)), at].split([len(group) for group in texts])
        return torch.stack([group.mean(0) for group in per_row])

    def value_change(self, request: EditRequest, key: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The change d to the layer's output at the subject's last token that makes every prompt give the target
        (Adam on NLL + KL on "{subject} is a" + weight decay, ||d|| clamped relative to the current output at
        `key`); with the last step's losses."""
        prompts = self.prompts(request)
        essence = f"{request.subject} is a" if request.subject else request.prompt
        texts = [*prompts, essence]
        rows, at = self.rows_at_subject(texts, [request.subject] * len(texts), [request.target] * len(prompts) + [""])
        row_index = torch.arange(len(texts), device=at.device)
        last = rows.attention_mask.sum(-1)[-1] - 1  # the essence row predicts its next token here
        scored = rows.scored.clone()
        scored[-1, last] = True  # after the prompts' target positions (the essence row has no target)
        with torch.no_grad():
            reference = scored_logits(self.model, rows, scored)[-1].float().log_softmax(-1)
        current_norm = F.linear(key, self.adapter.weight + self.tau).norm()
        change = key.new_zeros(self.adapter.weight.shape[0], requires_grad=True)
        optimizer, steps = torch.optim.Adam([change], lr=self.lr), 0
        while steps < self.n_iter:
            steps += 1
            with added_to_output(self.adapter, row_index, at, change):
                logits = scored_logits(self.model, rows, scored)
            nll = edit_nll(logits[:-1], rows, len(prompts)).mean()
            kl = F.kl_div(reference, logits[-1].float().log_softmax(-1), log_target=True, reduction="sum")
            decay = change.pow(2).sum() / current_norm.pow(2)
            loss = nll + self.kl_weight * kl + self.weight_decay * decay
            if nll.item() < self.early_stop_loss:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                change.mul_(min(1.0, (self.clamp_norm * current_norm / change.norm().clamp(min=1e-12)).item()))
        stats = {"loss": loss.item(), "edit_loss": nll.item(), "kl": kl.item(), "steps": float(steps)}
        return change.detach(), stats

    def rank_one_update(self, key: Tensor, change: Tensor) -> Tensor:
        """d (C^-1 k)^T / (k^T C^-1 k): maps k to d, and moves the keys least like k the least."""
        direction = self.inverse_moment.to(key.device) @ key.double()
        return (torch.outer(change.double(), direction) / (direction @ key.double())).to(self.tau.dtype)

    def publish(self) -> None:
        """Serve the weight change to every sequence (no router)."""
        self.adapter.serve([self.tau], [-math.inf])

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "tau_norm": float(self.tau.norm()), "edits": self.edits}

    # checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.clone(), "prefixes": self.prefixes, "edits": self.edits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = state["tau"].to(self.adapter.weight)
        self.prefixes, self.edits = state["prefixes"], state["edits"]
        self.publish()
