"""Short texts the unedited model writes, put before edit prompts so that an edit also holds after other text."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

PREFIX_SEEDS = ("I", "You", "Because", "Yes", "So", "The", "When", "It", "We", "In")


@torch.no_grad()
def generate_prefixes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, length: int, seed: int
) -> list[str]:
    """`count` texts of `length` sampled tokens after seeds like "I" or "Because" (seeded, whitespace folded)."""
    texts = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in PREFIX_SEEDS[:count]:
            inputs = tokenizer(start, return_tensors="pt").to(model.device)
            out = model.generate(**inputs, do_sample=True, max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
            texts.append(" ".join(tokenizer.decode(out[0], skip_special_tokens=True).split()))
    return texts
