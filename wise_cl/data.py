"""The edit stream as a Lightning DataModule: one training batch = one experience of edit requests."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from wise_cl.records import EditDataError, EditRequest, read_prompts, read_requests, resolve_data_path

TEXT_FIELDS = ("prompt", "target", "locality_prompt", "locality_answer", "ood_rephrase")


@dataclass
class EditBatch:
    """Edit requests with their positions in the stream."""

    indices: list[int]
    requests: list[EditRequest]

    def __len__(self) -> int:
        return len(self.requests)

    @staticmethod
    def collate(items: list[tuple[int, EditRequest]]) -> EditBatch:
        return EditBatch([i for i, _ in items], [r for _, r in items])


class EditRequests(Dataset):
    """`(stream index, request)` pairs."""

    def __init__(self, requests: list[EditRequest]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> tuple[int, EditRequest]:
        return i, self.requests[i]


class ResumingBatchSampler(Sampler[list[int]]):
    """Consecutive batches from stream index `start` on; its length counts the whole stream so that
    Lightning's batch counters, restored from a checkpoint, end the epoch after the last edit."""

    def __init__(self, size: int, batch_size: int, start: int = 0) -> None:
        self.size, self.batch_size, self.start = size, batch_size, start

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.start, self.size, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.size)))

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)


class EditStreamLoader(DataLoader):
    """A DataLoader Lightning treats as resumable: the position lives in the module's checkpoint
    (`edits_done`), which `EditStreamDataModule.train_dataloader` reads to start after it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore here: see the class docstring."""


def chat_turn(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """`text` as a user turn of the tokenizer's chat template, followed by the opening of the assistant's turn."""
    if not tokenizer.chat_template:
        raise ValueError("data.chat_template: the model's tokenizer has no chat template")
    turn = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def as_chat(requests: list[EditRequest], tokenizer: PreTrainedTokenizerBase) -> list[EditRequest]:
    """The requests with every prompt put into the chat template (see `chat_turn`); answers unchanged."""
    chat = partial(chat_turn, tokenizer)
    return [
        replace(
            r,
            prompt=chat(r.prompt),
            locality_prompt=chat(r.locality_prompt),
            rephrases=tuple(map(chat, r.rephrases)),
            ood_rephrase=chat(r.ood_rephrase) if r.ood_rephrase else None,
        )
        for r in requests
    ]


class EditStreamDataModule(L.LightningDataModule):
    """`num_edits` consecutive requests of a data file from `start` on, in file order.

    Args:
        path: a bundled data set (`zsre`, `zsre_train`, `hallucination`, `temporal`, `counterfact`; the dev parts
            `hallucination_train` and `temporal_train`) or a JSON file.
        num_edits: how many requests the stream holds (T).
        start: index of the stream's first request in the file (for consecutive chunks).
        edits_per_experience: requests per training batch; each batch is one experience.
        eval_batch_size: requests per batch when scoring.
        layout: force a layout instead of detecting it from the first record.
        chat_template: put every prompt (edit, rephrasings, locality, out-of-distribution) into the model's
            chat template as a user turn followed by the opening of the assistant's turn (instruct models).
        prompts: for `predict`, the prompts to answer: a JSON or JSON Lines file (strings, or records with a
            `prompt` field) or the texts themselves (`wise-cl predict --prompt TEXT` sets this).
    """

    def __init__(
        self,
        path: str | Path = "zsre",
        num_edits: int = 100,
        edits_per_experience: int = 1,
        eval_batch_size: int = 16,
        layout: str | None = None,
        start: int = 0,
        chat_template: bool = False,
        prompts: list[str] | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_edits", num_edits),
            ("edits_per_experience", edits_per_experience),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if start < 0:
            raise ValueError(f"data.start must be at least 0, got {start}")
        self.start = start
        self.path = path
        self.num_edits = num_edits
        self.edits_per_experience = edits_per_experience
        self.eval_batch_size = eval_batch_size
        self.layout = layout
        self.chat_template = chat_template
        self.prompts = prompts
        self.requests: list[EditRequest] = []
        self.predict_prompts: list[tuple[str, str]] = []  # (as given, as the model reads it)

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if not self.requests:
            self.requests = read_requests(self.path, self.layout, self.num_edits, self.start)
            if self.chat_template:
                if self.trainer is None:
                    raise ValueError(
                        "data.chat_template: the tokenizer is the trainer's module's; outside a Trainer use as_chat"
                    )
                self.requests = as_chat(self.requests, self.trainer.lightning_module.tokenizer)
        if stage == "predict":
            prompts = self.read_predict_prompts()
            inputs = prompts
            if self.chat_template:
                inputs = [chat_turn(self.trainer.lightning_module.tokenizer, p) for p in prompts]
            self.predict_prompts = list(zip(prompts, inputs, strict=True))

    def read_predict_prompts(self) -> list[str]:
        if self.prompts is None:
            raise ValueError("predict needs prompts: --data.prompts FILE (JSON or JSON Lines) or --prompt TEXT")
        if isinstance(self.prompts, str):
            return read_prompts(self.prompts)
        for index, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ValueError(f"data.prompts[{index}]: empty prompt")
        return list(self.prompts)

    def check_lengths(self, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> None:
        """Refuse a request with a text longer than `max_tokens` tokens (the model's context), naming
        the file, record and field, before any edit is made."""
        path = resolve_data_path(self.path)
        for index, request in enumerate(self.requests, self.start):
            texts = {name: getattr(request, name) for name in TEXT_FIELDS}
            texts |= {f"rephrases[{i}]": text for i, text in enumerate(request.rephrases)}
            for name, text in texts.items():
                # a token covers at least one byte (plus a few special tokens): only long texts need the tokenizer
                if text and len(text.encode()) + 4 > max_tokens and len(tokenizer(text)["input_ids"]) > max_tokens:
                    raise EditDataError(path, f"longer than the model's {max_tokens} tokens", index, name)

    def train_dataloader(self) -> DataLoader:
        """The edits not yet applied: a resumed run starts after the edits its module already holds."""
        done = getattr(self.trainer.lightning_module, "edits_done", 0) if self.trainer else 0
        sampler = ResumingBatchSampler(len(self.requests), self.edits_per_experience, start=done)
        return EditStreamLoader(EditRequests(self.requests), batch_sampler=sampler, collate_fn=EditBatch.collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(EditRequests(self.requests), batch_size=self.eval_batch_size, collate_fn=EditBatch.collate)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_prompts, batch_size=self.eval_batch_size, collate_fn=list)
