"""Shared fixtures: the tiny random LLaMA for mechanics, the bundled SmolLM2 for end-to-end checks."""

import pytest
import torch

from wise_cl.models import load_model
from wise_cl.records import read_requests

TINY_LAYER = "model.layers.2.mlp.down_proj"
# wise-cl arguments that run WISE on the tiny model in a few seconds
TINY_WISE = [
    "--model.model_name=tiny",
    "--model.exact_match=false",
    "--model.strategy.layer=model.layers.2.mlp.down_proj",
    "--model.strategy.n_iter=3",
    "--model.strategy.num_context=1",
    "--model.strategy.context_length=3",
]


@pytest.fixture
def tiny():
    """A fresh tiny random LLaMA and its byte tokenizer."""
    torch.manual_seed(0)
    return load_model("tiny")


@pytest.fixture(scope="session")
def zsre10():
    return read_requests("zsre", limit=10)


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct (converted once to the user cache)."""
    return load_model("smollm2-135m")
