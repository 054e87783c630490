"""The Avalanche front end on the tiny model: benchmark layout, editing with WISE, metrics reaching loggers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from avalanche.logging import TensorboardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from wise_cl.avalanche import AvalancheEditor, edit_benchmark, edit_evaluator
from wise_cl.evaluation import locality_reference
from wise_cl.models import load_model
from wise_cl.records import EditRequest, read_requests
from wise_cl.strategies.wise import WISE

NUM_EDITS = 4


@pytest.fixture(scope="module")
def requests() -> list[EditRequest]:
    return read_requests("zsre", limit=NUM_EDITS)


def tiny_wise() -> WISE:
    return WISE(layer="model.layers.2.mlp.down_proj", n_iter=5, num_context=1, edits_per_shard=2, shards_per_merge=2)


def test_benchmark_splits_requests_in_file_order(requests: list[EditRequest]) -> None:
    benchmark = edit_benchmark(requests, edits_per_experience=3)
    train = [list(exp.dataset) for exp in benchmark.train_stream]
    assert [[i for i, _ in items] for items in train] == [[0, 1, 2], [3]]
    assert [r for items in train for _, r in items] == requests
    (test,) = benchmark.test_stream
    assert list(test.dataset) == list(enumerate(requests))
    assert [len(edit_benchmark(requests).train_stream), len(edit_benchmark(requests).test_stream)] == [NUM_EDITS, 1]


def test_benchmark_rejects_bad_arguments(requests: list[EditRequest]) -> None:
    with pytest.raises(ValueError, match="edits_per_experience"):
        edit_benchmark(requests, edits_per_experience=0)
    with pytest.raises(ValueError, match="at least one request"):
        edit_benchmark([])


def test_editor_applies_all_edits_and_logs_scores(requests: list[EditRequest], tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny")
    benchmark = edit_benchmark(requests, edits_per_experience=1)
    strategy = tiny_wise()
    evaluator = edit_evaluator([TensorboardLogger(tmp_path)])
    editor = AvalancheEditor(
        model=model, tokenizer=tokenizer, strategy=strategy, requests=requests, evaluator=evaluator, exact_match=False
    )

    trained = editor.train(benchmark.train_stream)
    assert editor.edits_done == NUM_EDITS
    unedited, _ = load_model("tiny")  # same seed: the weights `model` had before editing
    assert all(map(torch.equal, editor.reference, locality_reference(unedited, tokenizer, requests)))
    assert trained["edit/steps/train_phase/train_stream"] >= 1
    # 4 edits, 2 per shard, 2 shards per merge: both shards closed and merged into one side memory
    assert strategy.memory.shards == [] and strategy.memory.merged is not None
    assert len(strategy.adapter.taus) >= 1

    results = editor.eval(benchmark.test_stream)
    scores = {name: results[f"{name}/eval_phase/test_stream"] for name in ("reliability", "generalization", "locality")}
    assert scores == {name: editor.scores[name] for name in scores}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert evaluator.get_all_metrics()["reliability/eval_phase/test_stream"][0] == [NUM_EDITS]

    evaluator.loggers[0].writer.flush()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Scalars("locality/eval_phase/test_stream")
    assert [(e.step, e.value) for e in logged] == [(NUM_EDITS, pytest.approx(scores["locality"]))]
