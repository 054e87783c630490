"""Score a model on edit requests: teacher-forced predictions at answer positions, greedy answers, metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.metrics import ExactMatch, TargetPerplexity, TokenAccuracy
from wise_cl.records import EditRequest
from wise_cl.rows import TeacherForcedBatch, answer_ids, teacher_forced_batch


def scored_logits(model: PreTrainedModel, batch: TeacherForcedBatch) -> Tensor:
    """Logits at the scored positions only: the decoder runs in full, the LM head on few rows."""
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[batch.scored])


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
def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
) -> list[str]:
    """Greedy answers from the prompts alone, each as many tokens long as its reference answer."""
    lengths = [len(answer_ids(tokenizer, a)) for a in answers]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    output = model.generate(
        **inputs,
        max_new_tokens=max(lengths),
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new_tokens, lengths, strict=True)]


class EditMetrics(nn.Module):
    """The edit metrics of a stream: reliability, generalization, locality, exact match, perplexity.

    `reference` holds the unedited model's locality predictions per request (see
    `locality_reference`); locality is the share of those predictions the edited model keeps.
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

    def update(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        reference: Sequence[Tensor],
    ) -> None:
        predict = partial(predict_answers, model, tokenizer, padding_side=self.padding_side)
        targets = [r.target for r in requests]
        edited = predict([r.prompt for r in requests], targets)
        self.reliability.update(edited.preds, edited.labels, edited.rows)
        self.perplexity.update(edited.nll, edited.rows)
        rephrased = [(p, r.target) for r in requests for p in r.rephrases]
        if rephrased:
            gen = predict(*zip(*rephrased, strict=True))
            self.generalization.update(gen.preds, gen.labels, gen.rows)
        ood = [(r.ood_rephrase, r.target) for r in requests if r.ood_rephrase]
        if ood:
            out = predict(*zip(*ood, strict=True))
            self.ood_generalization.update(out.preds, out.labels, out.rows)
        loc = predict([r.locality_prompt for r in requests], [r.locality_answer for r in requests])
        self.locality.update(loc.preds, torch.cat(list(reference)).to(loc.preds.device), loc.rows)
        if self.exact_match_enabled:
            self.exact_match.update(generate_answers(model, tokenizer, [r.prompt for r in requests], targets), targets)

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
