import json
from pathlib import Path

from conftest import TINY_LAYER, TINY_WISE

from wise_cl.benchmarks.compare import compare
from wise_cl.benchmarks.edit_speed import timed_stream
from wise_cl.benchmarks.sweep import variant_args


def test_compare_averages_chunks_writes_table_and_plot_and_skips_finished_runs(tmp_path):
    out = tmp_path / "compare"
    rows = compare([Path("configs/zsre_wise.yaml")], [1, 3], [2, 1], out, TINY_WISE)
    assert [(r["strategy"], r["T"], r["chunks"]) for r in rows] == [("wise", 1, 2), ("wise", 3, 1)]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["num_edits"] for r in runs] == [1, 1, 3] and all(r["edits_done"] == r["num_edits"] for r in runs)
    single = [r["reliability"] for r in runs[:2]]
    assert abs(rows[0]["reliability"] - sum(single) / 2) < 1e-9
    assert (out / "results.md").read_text().count("| wise |") == 2
    assert (out / "forgetting_curves.png").stat().st_size > 0
    assert (out / "tensorboard" / "wise" / "T3-chunk0").glob("events.out.tfevents.*")
    finished = out / "tensorboard" / "wise" / "T1-chunk1" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    compare([Path("configs/zsre_wise.yaml")], [1], [2], out, TINY_WISE)
    assert finished.stat().st_mtime_ns == stamp


def test_sweep_variant_becomes_strategy_overrides():
    assert variant_args("alpha=2 layer=model.layers.1.mlp.down_proj") == [
        "--model.strategy.init_args.alpha=2",
        "--model.strategy.init_args.layer=model.layers.1.mlp.down_proj",
    ]


def test_edit_speed_runs_the_plain_loop_with_the_cached_runs_steps(zsre10):
    settings = dict(layer=TINY_LAYER, n_iter=4, num_context=1, context_length=3, early_stop_loss=0.0)
    cached = timed_stream("tiny", settings, zsre10[:2])
    plain = timed_stream("tiny", settings, zsre10[:2], [e["steps"] for e in cached])
    assert [e["steps"] for e in cached] == [4, 4] == [e["steps"] for e in plain]
    assert all(e["seconds"] > 0 for e in cached + plain)
