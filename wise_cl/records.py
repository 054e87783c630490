"""Edit requests and readers for the JSON layouts used by WISE and EasyEdit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any


class EditDataError(ValueError):
    """A data file or record that cannot be used, with the file, record and field named."""

    def __init__(self, path: str | Path, message: str, index: int | None = None, field_name: str | None = None):
        where = str(path)
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class EditRequest:
    """One edit: make `prompt` answer `target`, generalise to the rephrases, leave locality alone.

    `locality_answer` may be empty (7 of the bundled hallucination records): that request has no locality score.
    """

    prompt: str
    target: str
    locality_prompt: str
    locality_answer: str
    rephrases: tuple[str, ...] = ()
    subject: str | None = None
    ood_rephrase: str | None = None


@dataclass(frozen=True)
class Layout:
    """How one JSON layout names the fields of an `EditRequest`."""

    name: str
    prompt: str
    target: str
    locality_prompt: str
    locality_answer: str
    rephrase: str | None = None
    ood_rephrase: str | None = None
    signature: tuple[str, ...] = field(default=())

    def matches(self, record: dict[str, Any]) -> bool:
        return all(key in record for key in self.signature)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("zsre", "src", "alt", "loc", "loc_ans", rephrase="rephrase", signature=("src", "alt")),
        Layout(
            "counterfact",
            "prompt",
            "target_new",
            "locality_prompt",
            "locality_ground_truth",
            rephrase="rephrase_prompt",
            signature=("prompt", "target_new", "rephrase_prompt"),
        ),
        Layout(
            "temporal",
            "prompt",
            "target_new",
            "locality_prompt",
            "locality_ground_truth",
            ood_rephrase="ood_rephrase",
            signature=("prompt", "target_new", "ood_rephrase"),
        ),
        Layout(
            "hallucination",
            "prompt",
            "target_new",
            "locality_prompt",
            "locality_ground_truth",
            signature=("prompt", "target_new"),
        ),
    )
}

BUNDLED_FILES = {
    "zsre": "zsre/zsre_mend_edit.json",
    "zsre_train": "zsre/zsre_train_sample.json",
    "hallucination": "hallucination/hallucination-edit.json",
    "hallucination_train": "hallucination/hallucination-train.json",
    "temporal": "temporal/temporal-edit.json",
    "temporal_train": "temporal/temporal-train.json",
    "counterfact": "counterfact/counterfact-edit.json",
}
IRRELEVANT_KEYS = {"zsre": "ZsRE", "hallucination": "hallucination", "temporal": "temporal"}


def bundled_path(relative: str) -> Path:
    """Path of a bundled editing data file (under `wise_cl/benchmarks/data`)."""
    return Path(str(resources.files("wise_cl.benchmarks") / "data" / relative))


def resource_path(name: str) -> Path:
    """Path of a text list the library itself trains with (under `wise_cl/resources`)."""
    return Path(str(resources.files("wise_cl") / "resources" / name))


def resolve_data_path(path_or_name: str | Path) -> Path:
    """A bundled data set name (`zsre`, `counterfact`, ...) or a path to a JSON file."""
    if str(path_or_name) in BUNDLED_FILES:
        return bundled_path(BUNDLED_FILES[str(path_or_name)])
    return Path(path_or_name)


def _load_json(path: Path) -> Any:
    """A JSON document, or a JSON Lines file as the list of its lines' values (UTF-8, with or without BOM)."""
    if not path.is_file():
        raise EditDataError(path, "file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise EditDataError(path, f"not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several documents: JSON Lines
            return _load_json_lines(path, text)
        raise EditDataError(path, f"malformed JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None


def _load_json_lines(path: Path, text: str) -> list[Any]:
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EditDataError(
                    path, f"malformed JSON Lines (line {number}, column {err.colno}): {err.msg}"
                ) from None
    return values


def _text(
    path: Path, index: int, record: dict[str, Any], key: str, required: bool = True, blank: bool = False
) -> str | None:
    """The non-blank text in `record[key]` (None if absent and not required; with `blank`, "" if blank)."""
    value = record.get(key)
    if value is None:
        if required:
            raise EditDataError(path, "missing field", index, key)
        return None
    if not isinstance(value, str):
        raise EditDataError(path, f"expected text, got {type(value).__name__}", index, key)
    if not value.strip():
        if blank:
            return ""
        raise EditDataError(path, "empty text", index, key)
    return value


def _texts(path: Path, index: int, record: dict[str, Any], key: str) -> tuple[str, ...]:
    """One text or a list of texts in `record[key]`, each non-blank (none if absent)."""
    value = record.get(key)
    values = value if isinstance(value, list) else [value] if value is not None else []
    return tuple(_text(path, index, {key: v}, key) for v in values)


def detect_layout(path: Path, records: Sequence[Any]) -> Layout:
    """The most specific layout that most records follow (`LAYOUTS` lists the specific ones first)."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EditDataError(path, f"expected a JSON object, got {type(record).__name__}", index)
    for layout in LAYOUTS.values():
        if 2 * sum(layout.matches(record) for record in records) > len(records):
            return layout
    fields = sorted(records[0])
    raise EditDataError(path, f"unknown layout (record 0 has fields {fields}); expected one of {sorted(LAYOUTS)}")


def _to_request(path: Path, index: int, record: Any, layout: Layout) -> EditRequest:
    if not isinstance(record, dict):
        raise EditDataError(path, f"expected a JSON object, got {type(record).__name__}", index)
    for key in layout.signature:
        if key not in record:
            raise EditDataError(path, f"missing field of the {layout.name} layout", index, key)
    get = partial(_text, path, index, record)
    return EditRequest(
        prompt=get(layout.prompt),
        target=get(layout.target),
        locality_prompt=get(layout.locality_prompt),
        locality_answer=get(layout.locality_answer, blank=True),
        rephrases=_texts(path, index, record, layout.rephrase) if layout.rephrase else (),
        subject=get("subject", False),
        ood_rephrase=get(layout.ood_rephrase) if layout.ood_rephrase else None,
    )


def read_requests(
    path_or_name: str | Path, layout: str | None = None, limit: int | None = None, start: int = 0
) -> list[EditRequest]:
    """Read edit requests from a bundled data set name or a JSON file in a known layout.

    The layout is the most specific one most records follow, unless `layout` names one; every record must
    carry its fields. JSON Lines files (one record per line) are read too. `start` and `limit`
    keep records `start .. start + limit - 1` in file order; every kept record is validated.
    """
    path = resolve_data_path(path_or_name)
    records = _load_json(path)
    if not isinstance(records, list) or not records:
        raise EditDataError(path, "expected a non-empty JSON list of records")
    if layout is not None and layout not in LAYOUTS:
        raise EditDataError(path, f"unknown layout '{layout}'; expected one of {sorted(LAYOUTS)}")
    chosen = LAYOUTS[layout] if layout else detect_layout(path, records)
    stop = len(records) if limit is None else start + limit
    if not 0 <= start < stop <= len(records):
        raise EditDataError(path, f"asked for requests {start}..{stop - 1} but the file holds {len(records)}")
    return [_to_request(path, i, records[i], chosen) for i in range(start, stop)]


def read_irrelevant_prompts(source: str | Path = "zsre", count: int | None = None) -> list[str]:
    """The irrelevant texts WISE pairs with edit i during editing.

    `source` is a bundled data set name (its WISE list), or a JSON file holding a list of strings.
    """
    if str(source) in IRRELEVANT_KEYS:
        path = resource_path("wise_loc_prompts.json")
        texts = _load_json(path)[IRRELEVANT_KEYS[str(source)]]
    else:
        path = Path(source)
        texts = _load_json(path)
    _check_texts(path, texts)
    if count is not None and count > len(texts):
        raise EditDataError(path, f"needs {count} irrelevant prompts but holds {len(texts)}")
    return texts[:count] if count is not None else texts


def read_subjects(source: str | Path = "bundled") -> list[str]:
    """Subjects to swap into edit prompts: `bundled` (1000 CounterFact subjects no bundled request has,
    see `data/PROVENANCE.md`) or a JSON file holding a list of strings."""
    return _read_text_list(source, "subjects.json")


def read_negative_prompts(source: str | Path = "bundled") -> list[str]:
    """Prompts about other subjects for edits to train against: `bundled` (2000 CounterFact training-split prompts
    whose subjects no bundled file mentions, see `data/PROVENANCE.md`) or a JSON file holding a list of strings."""
    return _read_text_list(source, "negative_prompts.json")


def _read_text_list(source: str | Path, bundled_name: str) -> list[str]:
    """A JSON list of texts: the library's resource `bundled_name` for `bundled`, else the file `source`."""
    path = resource_path(bundled_name) if str(source) == "bundled" else Path(source)
    texts = _load_json(path)
    _check_texts(path, texts)
    return texts


def read_corpus(source: str | Path = "wikipedia") -> list[str]:
    """Plain texts to measure a layer on: `wikipedia` (the 306 passages of the bundled hallucination training
    split, prompt and continuation joined; no edit stream draws on them) or a JSON file holding a list of strings."""
    if str(source) == "wikipedia":
        path = bundled_path("hallucination/hallucination-train.json")
        texts = [f"{record['prompt']} {record['target_new']}" for record in _load_json(path)]
    else:
        path = Path(source)
        texts = _load_json(path)
    _check_texts(path, texts)
    return texts


def read_prompts(path: str | Path) -> list[str]:
    """Prompts to answer: a JSON list or JSON Lines file of texts, or of records with a `prompt` field."""
    path = Path(path)
    values = _load_json(path)
    values = [values] if isinstance(values, dict) else values
    if not isinstance(values, list) or not values:
        raise EditDataError(path, "expected prompts: a non-empty list of texts or of records with a 'prompt' field")
    return [_text(path, i, v if isinstance(v, dict) else {"prompt": v}, "prompt") for i, v in enumerate(values)]


def _check_texts(path: Path, texts: Any) -> None:
    if not isinstance(texts, list) or not texts:
        raise EditDataError(path, "expected a non-empty JSON list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise EditDataError(path, "expected non-empty text", i)
