"""wise-cl: lifelong model editing with WISE on PyTorch Lightning.

The names below are the public API; each is imported on first use, so `import wise_cl` stays cheap.

    from wise_cl import WISE, EditingModule, EditStreamDataModule
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    # the Lightning run
    "EditingModule": "wise_cl.module",
    "EditStreamDataModule": "wise_cl.data",
    "EditBatch": "wise_cl.data",
    "ForgettingCurve": "wise_cl.callbacks",
    "EditCheckpoint": "wise_cl.callbacks",
    # strategies
    "EditStrategy": "wise_cl.strategies.base",
    "WISE": "wise_cl.strategies.wise",
    "FineTune": "wise_cl.strategies.finetune",
    "EWC": "wise_cl.strategies.finetune",
    "GRACE": "wise_cl.strategies.grace",
    "DEFER": "wise_cl.strategies.defer",
    "ROME": "wise_cl.strategies.rome",
    "MEMIT": "wise_cl.strategies.memit",
    # data, models, serving
    "EditRequest": "wise_cl.records",
    "EditDataError": "wise_cl.records",
    "read_requests": "wise_cl.records",
    "load_model": "wise_cl.models",
    "load_side_memories": "wise_cl.side_memory",
    "load_edited": "wise_cl.serving",
    "export_edited": "wise_cl.serving",
    "answer_prompts": "wise_cl.serving",
    "EditMetrics": "wise_cl.evaluation",
    # Avalanche
    "edit_benchmark": "wise_cl.avalanche",
    "AvalancheEditor": "wise_cl.avalanche",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'wise_cl' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
