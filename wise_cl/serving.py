"""An edited model people can use: greedy answers with the memory that gave each, and a WISE run's side
memories exported to a folder that `load_edited` turns back into a transformers model.

An export folder holds `wise_cl.json` (the base model's name or path, the edited layer, each memory's
routing threshold) and `side_memories.safetensors` (the task vectors, see `save_side_memories`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.checkpoints import load_run_state
from wise_cl.evaluation import first_lines
from wise_cl.models import load_model
from wise_cl.provenance import code_version
from wise_cl.side_memory import MAIN, SideMemoryLinear, load_side_memories
from wise_cl.strategies.wise import WISE

EXPORT_CONFIG = "wise_cl.json"
SIDE_MEMORIES = "side_memories.safetensors"
ANSWER_TOKENS = 32
ROUTING = (
    "per sequence: the side memory with the highest activation score answers if that score exceeds its"
    " threshold, else the main memory; decided on the prompt and kept for every generated token (decided"
    " again on each new token alone when keep_route is false); a teacher-forced sequence is scored on its"
    " prompt alone when route_on is prompt"
)


def answer_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = ANSWER_TOKENS,
) -> list[dict[str, Any]]:
    """Greedy answers of up to `max_new_tokens` tokens, stopped at the end of text or a newline, each with
    the memory that answered (`main` or a side memory's index; absent when the model has no side memory;
    for a model that routes every generated token again, the memory of the last one)."""
    texts = first_lines(model, tokenizer, prompts, max_new_tokens)
    answers = [{"prompt": prompt, "answer": text} for prompt, text in zip(prompts, texts, strict=True)]
    adapter = next((m for m in model.modules() if isinstance(m, SideMemoryLinear)), None)
    if adapter is not None and adapter.route is not None:  # the route decided on the prompts, kept while generating
        for answer, memory in zip(answers, adapter.route.tolist(), strict=True):
            answer["memory"] = "main" if memory == MAIN else memory
    return answers


def wise_run(path: str | Path) -> tuple[WISE, dict[str, Any], dict[str, Any]]:
    """A WISE run's strategy holding its side memories as last saved, on a freshly loaded model, with the run's
    config and checkpoint state; `path` is a run folder or its `last.ckpt`."""
    path = Path(path)
    checkpoint = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    state = load_run_state(checkpoint)
    config = state.get("config")
    if config is None:  # a run started from Python rather than `wise-cl`: its folder may hold the config
        config_file = checkpoint.parent.parent / "config.yaml"
        if not config_file.is_file():
            raise ValueError(f"{checkpoint}: records no config and {config_file} is missing")
        config = yaml.safe_load(config_file.read_text())
    spec = config["model"].get("strategy") or {"class_path": f"{WISE.__module__}.WISE"}
    if spec["class_path"] != f"{WISE.__module__}.WISE":  # nothing else is imported from a run's files
        raise ValueError(f"{checkpoint}: the run's strategy is {spec['class_path']}; only WISE runs have side memories")
    strategy = WISE(**spec.get("init_args", {}))
    strategy.prepare(*load_model(config["model"]["model_name"]))
    strategy.load_state_dict(state["strategy"])
    return strategy, config, state


def export_edited(run: str | Path, out: str | Path) -> Path:
    """Write a WISE run's serving side memories and routing settings to the folder `out`; returns it."""
    strategy, config, state = wise_run(run)
    base = config["model"]["model_name"]
    if Path(base).exists():  # a local model folder: recorded so that the export loads from anywhere
        base = str(Path(base).resolve())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strategy.save_side_memories(out / SIDE_MEMORIES)
    settings = {
        "base_model": base,
        "layer": strategy.layer,
        "thresholds": strategy.adapter.thresholds,
        "route_on": strategy.route_on,
        "keep_route": strategy.keep_route,
        "score_activation": strategy.adapter.score_activation,
        "routing": ROUTING,
        "edits": state["edits_done"],
        "run": str(Path(run).resolve()),
        "exported_by": code_version(),
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return out


def side_memories_file(path: str | Path) -> Path:
    """The side-memory file of an export folder, or `path` itself when it is a file."""
    path = Path(path)
    return path / SIDE_MEMORIES if path.is_dir() else path


def load_edited(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` of an export folder: the base model with its side memories attached, so that
    `model.generate(...)` answers with them."""
    settings_file = Path(path) / EXPORT_CONFIG
    if not settings_file.is_file():
        raise ValueError(f"{path}: not an export folder (no {EXPORT_CONFIG}); `wise-cl export RUN OUT` writes one")
    try:
        base = json.loads(settings_file.read_text())["base_model"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{settings_file}: unreadable export settings ({error!r})") from None
    model, tokenizer = load_model(base)
    load_side_memories(model, side_memories_file(path))
    return model, tokenizer
