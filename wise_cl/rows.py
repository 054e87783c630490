"""Training and scoring rows: `prompt + " " + answer`, padded, with the positions that predict the answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass
class TeacherForcedBatch:
    """Prompt + answer rows, padded, with the positions whose next-token logits score the answer."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    scored: Tensor  # bool [batch, length]: logits here predict an answer token
    labels: Tensor  # answer token ids, row-major, one per True entry of `scored`
    rows: Tensor  # the row each label belongs to

    def to(self, device: torch.device | str) -> TeacherForcedBatch:
        return TeacherForcedBatch(*(t.to(device) for t in vars(self).values()))

    def prompt_mask(self) -> Tensor:
        """The attention mask without the answer tokens: what a model generating the answer has seen first."""
        answer = torch.zeros_like(self.scored)
        answer[:, 1:] = self.scored[:, :-1]  # the token each scored position predicts
        return self.attention_mask * ~answer


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str, prompt: str = "") -> list[int]:
    """Token ids of `answer` as it follows `prompt`: after a separating space, or directly after a prompt that
    ends a line (a chat template's assistant turn); none for no answer."""
    separator = "" if prompt.endswith("\n") else " "
    return tokenizer(separator + answer, add_special_tokens=False)["input_ids"] if answer else []


def teacher_forced_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    padding_side: str = "right",
) -> TeacherForcedBatch:
    """Tokenise `prompt + " " + answer` rows (no space after a prompt that ends a line); prompt and answer are
    tokenised apart and joined."""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append((prompt_ids, answer_ids(tokenizer, answer, prompt)))
    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    scored = torch.zeros((len(rows), length), dtype=torch.bool)
    labels, row_of_label = [], []
    for i, (prompt_ids, ids) in enumerate(rows):
        full = prompt_ids + ids
        start = 0 if padding_side == "right" else length - len(full)
        input_ids[i, start : start + len(full)] = torch.tensor(full)
        attention_mask[i, start : start + len(full)] = 1
        first = start + len(prompt_ids) - 1
        scored[i, first : first + len(ids)] = True
        labels += ids
        row_of_label += [i] * len(ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TeacherForcedBatch(
        input_ids, attention_mask, position_ids, scored, torch.tensor(labels), torch.tensor(row_of_label)
    )
