"""End-to-end checks on the bundled SmolLM2-135M-Instruct (a few seconds each once the cache is warm)."""

import pytest

from wise_cl.data import EditBatch
from wise_cl.evaluation import EditMetrics, generate_answers, locality_reference, predict_answers
from wise_cl.records import EditRequest
from wise_cl.strategies.wise import WISE

pytestmark = pytest.mark.slow


def test_bundled_model_answers_a_known_fact(bundled):
    model, tokenizer = bundled
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert generate_answers(model, tokenizer, ["The capital of France is"], ["Paris"]) == [" Paris"]


def test_unedited_scores_on_zsre(bundled, zsre10):
    model, tokenizer = bundled
    metrics = EditMetrics(exact_match=False)
    metrics.update(model, tokenizer, zsre10, locality_reference(model, tokenizer, zsre10))
    scores = metrics.compute()
    assert scores["locality"] == 1.0
    assert 0.0 <= scores["reliability"] < 0.6 and 0.0 <= scores["generalization"] < 0.6


def test_wise_edit_on_bundled_model(bundled):
    model, tokenizer = bundled
    request = EditRequest("The capital of France is", "Rome", "The capital of Japan is", "Tokyo")
    before = predict_answers(model, tokenizer, [request.prompt], [request.target]).nll.item()
    strategy = WISE(n_iter=20, num_context=2)
    strategy.prepare(model, tokenizer)
    strategy.edit(EditBatch([0], [request]))
    after = predict_answers(model, tokenizer, [request.prompt], [request.target]).nll.item()
    strategy.detach()
    assert after < before - 2.0
