"""Short texts the unedited model writes, put before edit prompts so that an edit also holds after other text."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PREFIX_SEEDS = ("I", "You", "Because", "Yes", "So", "The", "When", "It", "We", "In")
# the paper's code: greedy continuations of these five, first of 5 new tokens, then of 10
OFFICIAL_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
OFFICIAL_LENGTHS = (5, 10)
PREFIX_STYLES = ("sampled", "official")


@torch.no_grad()
def continuation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start: str, length: int, sample: bool
) -> str:
    """`start` and `length` new tokens the model writes after it (sampled or greedy), whitespace folded."""
    inputs = tokenizer(start, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, do_sample=sample, max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
    return " ".join(tokenizer.decode(out[0], skip_special_tokens=True).split())


def generate_prefixes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    length: int,
    seed: int,
    style: str = "sampled",
) -> list[str]:
    """`count` prefixes: `sampled`, `length` sampled tokens after seeds like "I" or "Because" (seeded);
    `official`, the paper's code's greedy continuations (`length` unused), each seed alone and unpadded."""
    if style == "official":
        starts = [(start, n) for n in OFFICIAL_LENGTHS for start in OFFICIAL_SEEDS][:count]
        return [continuation(model, tokenizer, start, n, sample=False) for start, n in starts]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [continuation(model, tokenizer, start, length, sample=True) for start in PREFIX_SEEDS[:count]]
