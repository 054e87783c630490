"""Score a model on edit requests: teacher-forced predictions at answer positions, greedy answers, metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.metrics import AnswerMatch, ExactMatch, TargetPerplexity, TokenAccuracy
from wise_cl.records import EditRequest
from wise_cl.rows import TeacherForcedBatch, answer_ids, teacher_forced_batch
from wise_cl.side_memory import prompt_tokens

LOCALITY_TOKENS = 16  # greedy tokens compared for generation locality


def scored_logits(model: PreTrainedModel, batch: TeacherForcedBatch, positions: Tensor | None = None) -> Tensor:
    """Logits at the scored positions only (or at `positions`, [batch, tokens] bool), in row order: the decoder
    runs in full, the LM head on few rows."""
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[batch.scored if positions is None else positions])


@dataclass
class AnswerPredictions:
    """Argmax predictions and negative log-likelihoods at every answer position."""

    preds: Tensor
    labels: Tensor
    rows: Tensor
    nll: Tensor

    def per_row(self) -> list[Tensor]:
        num_rows = int(self.rows.max()) + 1 if self.rows.numel() else 0
        return list(torch.split(self.preds, torch.bincount(self.rows, minlength=num_rows).tolist()))


@torch.no_grad()
def predict_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    padding_side: str = "right",
    chunk_rows: int = 16,
) -> AnswerPredictions:
    """Teacher-forced predictions of `answers` after `prompts`.

    Rows run in chunks of similar length (less padding); results come back in the given order.
    """
    lengths = [len(p) + 2 * len(a) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    per_row: list[tuple[Tensor, Tensor, Tensor]] = [None] * len(prompts)  # type: ignore[list-item]
    for start in range(0, len(order), chunk_rows):
        chunk = order[start : start + chunk_rows]
        batch = teacher_forced_batch(
            tokenizer, [prompts[i] for i in chunk], [answers[i] for i in chunk], padding_side
        ).to(model.device)
        with prompt_tokens(model, batch.prompt_mask()):
            logits = scored_logits(model, batch).float()
        nll = F.cross_entropy(logits, batch.labels, reduction="none")
        counts = torch.bincount(batch.rows, minlength=len(chunk)).tolist()
        for i, p, y, n in zip(
            chunk, logits.argmax(-1).split(counts), batch.labels.split(counts), nll.split(counts), strict=True
        ):
            per_row[i] = (p, y, n)
    preds, labels, nlls = (torch.cat([row[k] for row in per_row]) for k in range(3))
    rows = torch.cat([torch.full((len(row[0]),), i, dtype=torch.long) for i, row in enumerate(per_row)])
    return AnswerPredictions(preds, labels, rows.to(preds.device), nlls)


@torch.no_grad()
def greedy_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_at_eos: bool = False,
    chunk_rows: int = 16,
    stop_strings: Sequence[str] = (),
) -> list[Tensor]:
    """Greedy continuations of the prompts alone (left padded, in chunks): `max_new_tokens` token ids each,
    or up to the end-of-text token with `stop_at_eos` (padded after it), or up to the first of `stop_strings`."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    continuations = []
    try:
        for start in range(0, len(prompts), chunk_rows):
            inputs = tokenizer(list(prompts[start : start + chunk_rows]), return_tensors="pt", padding=True)
            output = model.generate(
                **inputs.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **({} if stop_at_eos else {"eos_token_id": None}),
                **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
            )
            continuations += list(output[:, inputs["input_ids"].shape[1] :].cpu())
    finally:
        tokenizer.padding_side = side
    return continuations


def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
) -> list[str]:
    """Greedy answers from the prompts alone, each as many tokens long as its reference answer."""
    lengths = [len(answer_ids(tokenizer, a, p)) for p, a in zip(prompts, answers, strict=True)]
    rows = greedy_tokens(model, tokenizer, prompts, max(lengths), chunk_rows=len(prompts))
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(rows, lengths, strict=True)]


def first_lines(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers of up to `max_new_tokens` tokens, stopped at the end of text or a newline."""
    rows = greedy_tokens(
        model, tokenizer, prompts, max_new_tokens, stop_at_eos=True, chunk_rows=len(prompts), stop_strings=["\n"]
    )
    return [text.split("\n")[0].strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


ScoredPrompt = tuple[int, str, str]  # (index of the request, prompt, answer)


def scored_prompts(requests: Sequence[EditRequest]) -> dict[str, list[ScoredPrompt]]:
    """The prompts each teacher-forced score reads, as `EditMetrics` scores them: the edit prompts, every
    rephrasing, the out-of-distribution texts a request has, the locality prompts; empty sets left out."""
    sets = {
        "reliability": [(i, r.prompt, r.target) for i, r in enumerate(requests)],
        "generalization": [(i, p, r.target) for i, r in enumerate(requests) for p in r.rephrases],
        "ood_generalization": [(i, r.ood_rephrase, r.target) for i, r in enumerate(requests) if r.ood_rephrase],
        "locality": [(i, r.locality_prompt, r.locality_answer) for i, r in enumerate(requests)],
    }
    return {name: prompts for name, prompts in sets.items() if prompts}


class EditMetrics(nn.Module):
    """The edit metrics of a stream: reliability, generalization, locality and perplexity (teacher-forced), and
    with `exact_match` the free-generation ones: exact match, answer match on the prompts and on the
    rephrasings, generation locality.

    `reference` holds the unedited model's locality predictions per request (see `locality_reference`);
    locality is the share of those predictions the edited model keeps. `generation_reference` holds the
    unedited model's greedy continuations of the locality prompts (see `generation_reference`); generation
    locality is the share of their tokens the edited model's continuations keep.
    """

    def __init__(self, exact_match: bool = True, padding_side: str = "right") -> None:
        super().__init__()
        self.padding_side = padding_side
        self.exact_match_enabled = exact_match
        self.reliability = TokenAccuracy()
        self.generalization = TokenAccuracy()
        self.ood_generalization = TokenAccuracy()
        self.locality = TokenAccuracy()
        self.perplexity = TargetPerplexity()
        self.exact_match = ExactMatch()
        self.answer_match = AnswerMatch()
        self.rephrase_answer_match = AnswerMatch()
        self.generation_locality = TokenAccuracy()

    def update(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        reference: Sequence[Tensor],
        generation_reference: Sequence[Tensor] | None = None,
    ) -> None:
        predict = partial(predict_answers, model, tokenizer, padding_side=self.padding_side)
        sets = scored_prompts(requests)
        scores = {}
        for name, scored in sets.items():
            _, texts, answers = zip(*scored, strict=True)
            scores[name] = predict(list(texts), list(answers))
        edited, loc = scores["reliability"], scores["locality"]
        self.perplexity.update(edited.nll, edited.rows)
        for name in ("reliability", "generalization", "ood_generalization"):
            if name in scores:
                getattr(self, name).update(scores[name].preds, scores[name].labels, scores[name].rows)
        self.locality.update(loc.preds, torch.cat(list(reference)).to(loc.preds.device), loc.rows)
        if self.exact_match_enabled:
            prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
            self.exact_match.update(generate_answers(model, tokenizer, prompts, targets), targets)
            self.answer_match.update(first_lines(model, tokenizer, prompts), targets)
            if "generalization" in sets:
                _, rephrased, answers = zip(*sets["generalization"], strict=True)
                self.rephrase_answer_match.update(first_lines(model, tokenizer, list(rephrased)), list(answers))
        if self.exact_match_enabled and generation_reference is not None:
            reference_tokens = torch.stack(list(generation_reference))
            length = reference_tokens.shape[1]
            generated = torch.stack(greedy_tokens(model, tokenizer, [r.locality_prompt for r in requests], length))
            rows = torch.arange(len(requests)).repeat_interleave(length)
            self.generation_locality.update(generated.flatten(), reference_tokens.flatten(), rows)

    def compute(self) -> dict[str, float]:
        """Every metric that saw at least one request."""
        return {
            name: float(metric.compute())
            for name, metric in self.named_children()
            if isinstance(metric, nn.Module) and metric.update_called
        }

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()


def locality_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> list[Tensor]:
    """The unedited model's argmax predictions on each request's locality answer (computed once per stream)."""
    loc = predict_answers(
        model, tokenizer, [r.locality_prompt for r in requests], [r.locality_answer for r in requests]
    )
    return [p.cpu() for p in loc.per_row()]


def generation_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> list[Tensor]:
    """The unedited model's greedy continuations of each request's locality prompt (`LOCALITY_TOKENS` tokens)."""
    return greedy_tokens(model, tokenizer, [r.locality_prompt for r in requests], LOCALITY_TOKENS)
