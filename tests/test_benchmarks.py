import cProfile
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LAYER, TINY_WISE

from wise_cl.benchmarks.ablation import PAPER, TUNED, ladder, with_changes
from wise_cl.benchmarks.ablation import main as ablation
from wise_cl.benchmarks.activation_overlap import mean_activations, overlap
from wise_cl.benchmarks.compare import compare, run_chunk
from wise_cl.benchmarks.edit_speed import time_by_function, timed_stream
from wise_cl.benchmarks.inference_overhead import inference_overhead, markdown
from wise_cl.benchmarks.robustness import Stream, aggregate, robustness, single_edit_streams
from wise_cl.benchmarks.router_analysis import main as router_analysis
from wise_cl.benchmarks.routing import routing_report, taken_by_other_memories
from wise_cl.benchmarks.scale_up import main as scale_up
from wise_cl.benchmarks.soak import main as soak
from wise_cl.benchmarks.stream_costs import costs, event_files
from wise_cl.benchmarks.sweep import key_values, run_names, variant_args
from wise_cl.benchmarks.tune_baselines import GRIDS, variants
from wise_cl.benchmarks.tune_baselines import main as tune_baselines
from wise_cl.benchmarks.weight_changes import main as weight_changes
from wise_cl.cli import main as wise_cl
from wise_cl.strategies.wise import WISE


@pytest.fixture(autouse=True)
def tiny_model_cache(tmp_path_factory, monkeypatch):
    """The runs here use the tiny model: what they cache stays out of the user's cache."""
    monkeypatch.setenv("WISE_CL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_compare_averages_chunks_writes_table_and_plot_and_skips_finished_runs(tmp_path):
    out = tmp_path / "compare"
    rows = compare([Path("configs/zsre_wise.yaml")], [1, 3], [2, 1], out, TINY_WISE, unedited=True)
    expected = [("unedited", 1, 2), ("unedited", 3, 1), ("wise", 1, 2), ("wise", 3, 1)]
    assert [(r["strategy"], r["T"], r["chunks"]) for r in rows] == expected
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["num_edits"] for r in runs] == [1, 1, 3] * 2
    assert all(r["edits_done"] == (0 if r["strategy"] == "unedited" else r["num_edits"]) for r in runs)
    # the unedited model keeps its own predictions; the edits change the edited prompts' answers
    assert rows[1]["locality"] == 1.0 and rows[3]["reliability"] > rows[1]["reliability"]
    single = [r["reliability"] for r in runs[3:5]]
    assert abs(rows[2]["reliability"] - sum(single) / 2) < 1e-9
    table = (out / "results.md").read_text()
    # the columns of the scores these runs have (no free generation here, no out-of-distribution rephrasings)
    assert table.count("| wise |") == 2 and "| commit | Rel. | Gen. | Loc. | PPL | s/edit |" in table
    assert rows[0]["commit"] == runs[0]["commit"][:7]  # the code version each row came from
    assert (out / "forgetting_curves.png").stat().st_size > 0
    assert list((out / "tensorboard" / "wise" / "T3-chunk0").glob("events.out.tfevents.*"))
    finished = out / "tensorboard" / "wise" / "T1-chunk1" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    compare([Path("configs/zsre_wise.yaml")], [1], [2], out, TINY_WISE)
    assert finished.stat().st_mtime_ns == stamp
    # a table of the finished runs only: a third chunk at T=1 and T=5 are named as missing, and nothing runs
    partial = compare([Path("configs/zsre_wise.yaml")], [1, 5], [3, 1], out, TINY_WISE, finished_only=True)
    assert [(r["T"], r["chunks"]) for r in partial] == [(1, 2)] and partial[0]["reliability"] == rows[2]["reliability"]
    assert not (out / "tensorboard" / "wise" / "T1-chunk2").exists()
    assert "not run yet (finished runs only): wise T1-chunk2, wise T5-chunk0" in (out / "results.md").read_text()


def test_sweep_runs_get_short_names_that_survive_reruns(tmp_path):
    assert run_names(tmp_path, ["lr=4", "alpha=2 beta=10"]) == {"lr=4": "v1", "alpha=2 beta=10": "v2"}
    names = run_names(tmp_path, ["beta=3", "lr=4"])  # a rerun with a new variant, in another order
    assert names["beta=3"] == "v3" and names["lr=4"] == "v1"
    assert json.loads((tmp_path / "variants.json").read_text())["alpha=2 beta=10"] == "v2"


def test_sweep_variant_becomes_strategy_overrides():
    assert variant_args("alpha=2 layer=model.layers.1.mlp.down_proj") == [
        "--model.strategy.init_args.alpha=2",
        "--model.strategy.init_args.layer=model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(SystemExit, match="--set 'lr': expected"):
        key_values(["lr"], "--set")


def strategy_settings(config: Path) -> dict:
    """A config's strategy settings, with every constructor default of its class (and of the classes it passes
    **kwargs to) filled in."""
    strategy = yaml.safe_load(config.read_text())["model"]["strategy"]
    module, name = strategy["class_path"].rsplit(".", 1)
    defaults = {}
    for base in reversed(getattr(__import__(module, fromlist=[name]), name).__mro__[:-1]):
        params = inspect.signature(base.__init__).parameters.values()
        defaults |= {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}
    return defaults | strategy["init_args"]


def test_ablation_steps_lead_from_the_paper_config_to_the_tuned_one():
    steps = ladder()
    assert steps[0] == ("the paper's config", "")
    settings = strategy_settings(PAPER)
    for key, value in (pair.split("=", 1) for pair in steps[-1][1].split()):
        settings[key] = yaml.safe_load(value)
    assert settings == strategy_settings(TUNED)
    # every step adds something, and a later step keeps what the earlier ones set
    variants = [set(variant.split()) for _, variant in steps]
    assert all(before < after for before, after in zip(variants, variants[1:], strict=False))


def test_ablation_changes_are_against_the_previous_step_on_the_same_chunk():
    rows = [
        {"chunk": 1, "reliability": 0.5, "exact_match": None},
        {"chunk": 2, "reliability": 0.9, "exact_match": 0.1},
        {"chunk": 1, "reliability": 0.75, "exact_match": 0.2},
    ]
    rows = with_changes([row | {"generalization": 0.1, "locality": 1.0, "edit_seconds_median": 2.0} for row in rows])
    assert [row["d_reliability"] for row in rows] == [None, None, 0.25]
    assert rows[2]["d_exact_match"] is None and rows[2]["d_locality"] == 0.0


def test_ablation_runs_each_step_on_the_paper_config_and_tabulates_the_changes(tmp_path, monkeypatch):
    monkeypatch.setattr("wise_cl.benchmarks.ablation.DEPARTURES", [("a higher lr", {"lr": 0.5})])
    out = tmp_path / "ablation"
    argv = ["ablation", "--num-edits", "1", "--chunks", "0", "--out", str(out), "--", *TINY_WISE]
    monkeypatch.setattr("sys.argv", argv)
    ablation()
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [row["step"] for row in rows] == ["the paper's config", "+ a higher lr"]
    runs = [out / "tensorboard" / row["run"] / "T1-chunk0" for row in rows]
    settings = [yaml.safe_load((run / "config.yaml").read_text())["model"]["strategy"]["init_args"] for run in runs]
    assert [s["lr"] for s in settings] == [1.0, 0.5]
    assert settings[0]["edits_per_shard"] == 500  # the paper's
    assert rows[1]["d_reliability"] == pytest.approx(rows[1]["reliability"] - rows[0]["reliability"])
    assert "| + a higher lr | 0 | v2 |" in (out / "ablation.md").read_text()


@pytest.mark.parametrize("config", list(GRIDS))
def test_tuning_grids_name_settings_of_their_strategy_and_differ_from_the_config(config):
    settings = strategy_settings(Path(config))
    for key, values in GRIDS[config].items():
        assert key in settings and settings[key] not in values, key
    grid_variants = variants(GRIDS[config])
    assert grid_variants[0] == "" and len(grid_variants) == 1 + sum(map(len, GRIDS[config].values()))


def test_tune_baselines_runs_each_setting_and_marks_the_best(tmp_path, monkeypatch):
    config = "configs/zsre_ewc_paper.yaml"  # FT-EWC with Adam and ROME's objective runs here too
    monkeypatch.setitem(GRIDS, config, {"n_iter": [1]})
    out = tmp_path / "tuning"
    tiny = ["--model.model_name=tiny", "--model.exact_match=false", f"--model.strategy.layer={TINY_LAYER}"]
    argv = ["tune_baselines", "--configs", config, "--num-edits", "2", "--chunk", "0", "--out", str(out), "--", *tiny]
    monkeypatch.setattr("sys.argv", argv)
    tune_baselines()
    rows = json.loads((out / "tuning.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["(as is)", "n_iter=1"]
    assert [row["strategy"] for row in rows] == ["ewc_paper"] * 2
    mean = [sum(row[k] for k in ("reliability", "generalization", "locality")) / 3 for row in rows]
    assert [row["quality"] for row in rows] == pytest.approx(mean)
    assert [row["best"] for row in rows] == [mean[0] >= mean[1], mean[0] < mean[1]]
    assert (out / "ewc_paper" / "tensorboard" / "v2" / "T2-chunk0" / "metrics.json").exists()
    assert "**best**" in (out / "tuning.md").read_text()


def test_edit_speed_times_the_plain_loop_on_the_same_edits_without_changing_the_stream(zsre10):
    settings = dict(layer=TINY_LAYER, n_iter=4, num_context=1, context_length=3, early_stop_loss=0.0, lr=0.5)
    cached, plain = timed_stream("tiny", settings, zsre10[:3], plain_every=2)
    alone, _ = timed_stream("tiny", settings, zsre10[:3], plain_every=10)
    assert [p["edit"] for p in plain] == [0, 2]
    assert [p["steps"] for p in plain] == [cached[0]["steps"], cached[2]["steps"]] == [4, 4]
    # the plain edit starts from the state the cached one started from, and leaves no trace
    assert [p["loss"] for p in plain] == pytest.approx([cached[0]["loss"], cached[2]["loss"]], rel=1e-4)
    assert [c["loss"] for c in cached] == [c["loss"] for c in alone]
    assert all(e["seconds"] > 0 for e in cached + plain)


def test_edit_speed_profiles_the_later_edits_by_function(zsre10):
    settings = dict(layer=TINY_LAYER, n_iter=2, num_context=1, context_length=3, edits_per_shard=1, shards_per_merge=1)
    profiler = cProfile.Profile()
    cached, plain = timed_stream("tiny", settings, zsre10[:3], plain_every=0, profiler=profiler, profile_from=1)
    seconds = time_by_function(profiler, edits=2, top=500)
    assert len(cached) == 3 and plain == []
    edit = next(name for name in seconds if name.startswith("strategies/wise.py") and name.endswith("(edit)"))
    merge = next(name for name in seconds if name.endswith("(merge)"))  # the callbacks are profiled too
    assert seconds[merge] > 0 and 0 < seconds[edit] <= max(e["seconds"] for e in cached[1:])


def test_routing_report_rescores_a_finished_run_under_other_thresholds(tmp_path):
    # without the calibrated floor, act_ratio alone sets the thresholds
    one_edit_memories = [
        f"--model.strategy.{key}" for key in ("edits_per_shard=1", "shards_per_merge=1", "calibration_texts=0")
    ]
    run_chunk(Path("configs/zsre_wise_retrieve.yaml"), "wise_retrieve", 3, 0, tmp_path, TINY_WISE + one_edit_memories)
    report = routing_report(tmp_path / "tensorboard" / "wise_retrieve" / "T3-chunk0", [0.0, 1e9])
    assert report["memories"] == 3
    assert set(report["holding_memory_accuracy"]) == {"reliability", "generalization"}
    open_gate, closed = report["act_ratio"]
    # threshold 0: every sequence goes to its best memory; a huge threshold: none leaves the main memory
    assert open_gate["reliability_routed"] == open_gate["locality_routed"] == 1.0
    assert closed["reliability_routed"] == closed["locality_routed"] == closed["reliability_routed_to_holder"] == 0.0
    assert closed["locality"] == 1.0 and len(closed["thresholds"]) == 3
    assert open_gate["locality_over_threshold_per_memory"] == [1.0] * 3
    assert closed["reliability_over_threshold_per_memory"] == [0.0] * 3
    # with every request routed, those that miss their memory went to an older or a newer one
    taken = open_gate["reliability_to_older_memory"] + open_gate["reliability_to_newer_memory"]
    assert taken == pytest.approx(1 - open_gate["reliability_routed_to_holder"])


def test_routing_report_counts_a_shard_router_s_route_as_reaching_the_merged_memory_that_holds_its_edits(tmp_path):
    settings = ("edits_per_shard=1", "shards_per_merge=1", "calibration_texts=0", "shard_routers=true")
    args = TINY_WISE + [f"--model.strategy.{key}" for key in settings]
    run_chunk(Path("configs/zsre_wise.yaml"), "wise", 3, 0, tmp_path, args)
    report = routing_report(tmp_path / "tensorboard" / "wise" / "T3-chunk0", [0.0, 1e9])
    assert report["memories"] == 4  # three shard routers and the merged memory that answers for them
    open_gate, closed = report["act_ratio"]
    assert open_gate["reliability_routed"] == open_gate["reliability_routed_to_holder"] == 1.0
    assert closed["reliability_routed"] == closed["reliability_routed_to_holder"] == 0.0
    assert closed["thresholds"][3] == float("inf") and closed["locality"] == 1.0


def test_routing_report_scores_every_rephrasing_as_the_run_did(tmp_path):
    # two rephrasings per request: the report's own-threshold scores are the run's
    records = [
        {
            "src": f"Who made work {i}?",
            "alt": f"Maker {i}",
            "rephrase": [f"Work {i} was made by", f"The maker of work {i}:"],
        }
        | {"loc": f"nq question: where is city {i}", "loc_ans": f"Land {i}"}
        for i in range(3)
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    args = TINY_WISE + ["--model.strategy.calibration_texts=0", f"--data.path={tmp_path / 'edits.json'}"]
    metrics = run_chunk(Path("configs/zsre_wise_retrieve.yaml"), "wise_retrieve", 3, 0, tmp_path, args)
    report = routing_report(tmp_path / "tensorboard" / "wise_retrieve" / "T3-chunk0")
    own = report["act_ratio"][0]
    assert len(own["generalization_per_request"]) == 6
    for name in ("reliability", "generalization", "locality"):
        assert own[name] == pytest.approx(metrics[name], abs=1e-6)
    assert 0 <= report["holding_memory_accuracy"]["generalization"] <= 1


def test_requests_taken_by_other_memories_are_counted_by_the_taking_memorys_age():
    rows = [{"routed": routed, "holder": 1} for routed in (0, 2, -1, 1)]
    assert taken_by_other_memories(rows) == {"to_older_memory": 0.25, "to_newer_memory": 0.25}


def test_router_analysis_scores_routed_side_and_main_and_the_route_margins(tmp_path, monkeypatch):
    args = TINY_WISE + ["--model.strategy.calibration_texts=0"]
    run_chunk(Path("configs/zsre_wise_retrieve.yaml"), "wise_retrieve", 3, 0, tmp_path, args)
    run = tmp_path / "tensorboard" / "wise_retrieve" / "T3-chunk0"
    own = routing_report(run)["act_ratio"][0]
    monkeypatch.setattr("sys.argv", ["router_analysis", str(run), "--out", str(tmp_path / "out")])
    router_analysis()
    (result,) = json.loads((tmp_path / "out" / "router_analysis.json").read_text())["runs"]
    assert (tmp_path / "out" / "router_analysis.png").is_file()
    assert "| wise_retrieve/T3-chunk0 | 3 | 1 | main |" in (tmp_path / "out" / "router_analysis.md").read_text()
    # routed: the run's own thresholds, as the routing report scores them; main: the unedited model
    for name in ("reliability", "generalization", "locality"):
        assert result["scores"]["routed"][name] == own[name]
        assert result["routed_share"][name] == own[f"{name}_routed"]
        assert len(result["score_ratios"][name]) == 3
    assert result["scores"]["main"]["locality"] == 1.0
    # no threshold: every sequence reaches the side memory, which holds the edits
    assert result["scores"]["side"]["reliability"] >= result["scores"]["main"]["reliability"]


def test_router_analysis_routes_through_shard_routers_to_the_merged_memory_as_the_run_did(tmp_path, monkeypatch):
    settings = ("edits_per_shard=1", "shards_per_merge=1", "calibration_texts=0", "shard_routers=true")
    args = TINY_WISE + [f"--model.strategy.{key}" for key in settings]
    metrics = run_chunk(Path("configs/zsre_wise.yaml"), "wise", 3, 0, tmp_path, args)
    run = tmp_path / "tensorboard" / "wise" / "T3-chunk0"
    own = routing_report(run)["act_ratio"][0]
    monkeypatch.setattr("sys.argv", ["router_analysis", str(run), "--out", str(tmp_path / "out")])
    router_analysis()
    (result,) = json.loads((tmp_path / "out" / "router_analysis.json").read_text())["runs"]
    assert result["memories"] == 4  # three routers and the merged memory, which only answers
    for name in ("reliability", "generalization", "locality"):
        assert result["scores"]["routed"][name] == pytest.approx(metrics[name], abs=1e-6)
        assert result["routed_share"][name] == own[f"{name}_routed"]
    # every edit prompt passes its router, so the margins are those of a route (not a score over inf)
    assert result["routed_share"]["reliability"] == 1.0
    assert min(result["score_ratios"]["reliability"]) > 1.0
    assert result["scores"]["side"]["reliability"] == result["scores"]["routed"]["reliability"]


def test_stream_costs_read_a_resumed_run_s_event_files_in_the_order_they_were_written(tmp_path):
    names = ["events.out.tfevents.1700000100.vm.local.12.0", "events.out.tfevents.1700000100.vm.local.12.1"]
    names.insert(0, "events.out.tfevents.999999999.vm.local.7.0")  # an earlier second, one digit fewer
    for age, name in enumerate(names):  # modification times in the opposite order, as a copy may leave them
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (2e9 - age, 2e9 - age))
    assert [f.name for f in event_files(tmp_path)] == names


def test_stream_costs_add_the_memory_callbacks_to_each_edit_and_read_every_checkpoint_write(tmp_path):
    shards = ["--model.strategy.edits_per_shard=1", "--model.strategy.shards_per_merge=2"]
    metrics = run_chunk(Path("configs/zsre_wise.yaml"), "wise", 4, 0, tmp_path, TINY_WISE + shards)
    result = costs(tmp_path / "tensorboard" / "wise" / "T4-chunk0", window=2)
    assert result["edits"] == 4 and len(result["seconds_per_edit"]) == 4
    # every edit's editing time plus what closing and merging its shards took, as the run counted them
    total = metrics["edit_seconds_total"] + metrics["memory_seconds_total"]
    assert sum(result["seconds_per_edit"]) == pytest.approx(total, rel=1e-4)
    assert result["last_over_first"] == pytest.approx(
        sum(result["seconds_per_edit"][2:]) / sum(result["seconds_per_edit"][:2])
    )
    # one checkpoint per edit (the config's EditCheckpoint), each logged with its size and write time
    assert len(result["checkpoint_megabytes"]) == 4 and result["checkpoint_megabytes_max"] > 0
    assert 0 < result["checkpoint_seconds_median"] <= result["checkpoint_seconds_max"]
    assert result["peak_rss_megabytes"] > 100  # torch and a model are loaded


def test_the_worst_stream_is_the_one_whose_edits_other_memories_take_most():
    rows = [
        {"stream": "a", "reliability": 0.9, "to_older_memory": 0.1, "edit_seconds_median": 3.0},
        {"stream": "b", "reliability": 0.8, "to_older_memory": 0.0, "edit_seconds_median": 4.0},
        {"stream": "c", "reliability": 1.0, "to_older_memory": 0.0, "edit_seconds_median": 50.0},
    ]
    summary = aggregate(rows)
    assert summary["worst"] == {"reliability": 0.8, "to_older_memory": 0.1, "edit_seconds_median": 50.0}
    assert summary["mean"]["to_older_memory"] == pytest.approx(0.1 / 3)
    # one paused stream sets the mean s/edit, not the median
    assert summary["mean"]["edit_seconds_median"] == pytest.approx(19.0)
    assert summary["median"]["edit_seconds_median"] == 4.0


def test_robustness_runs_each_stream_and_reports_mean_and_worst(tmp_path):
    streams = [Stream("zsre_train", 0, 3), Stream("counterfact", 5, 3), *single_edit_streams(2)]
    assert [s.name for s in streams[2:]] == ["zsre_1000_T1", "counterfact_1000_T1"]
    result = robustness(Path("configs/zsre_wise.yaml"), streams, tmp_path, TINY_WISE, curve_at=[3], routing=True)
    rows = result["streams"]["rows"]
    assert [r["stream"] for r in rows] == ["zsre_train_0_T3", "counterfact_5_T3"]
    for key in ("reliability", "locality"):
        values = [r[key] for r in rows]
        assert result["streams"]["mean"][key] == pytest.approx(sum(values) / 2)
        assert result["streams"]["worst"][key] == min(values)
    assert result["streams"]["worst"]["edit_seconds_median"] == max(r["edit_seconds_median"] for r in rows)
    # each stream's curve point after 3 edits, and its lowest reliability from edit 20 on (none in 3 edits)
    assert all(r["reliability@3"] is not None and r["curve_min_reliability_from_20"] is None for r in rows)
    # WISE-Merge holds every edit in its one memory: the routing report's forced and routed figures come along
    assert all(0 <= r["forced_reliability"] <= 1 and 0 <= r["routed_to_holder"] <= 1 for r in rows)
    assert all(0 <= r["forced_generalization"] <= 1 and 0 <= r["rephrase_routed_to_holder"] <= 1 for r in rows)
    assert (tmp_path / "runs" / "counterfact_5_T3" / "routing.json").is_file()
    lines = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| stream |"))
    # the scores these runs have (no free generation here) and no column that every row lacks (the curve's
    # lowest reliability from edit 20 on, in 3-edit streams)
    assert header == (
        "| stream | Rel. | Gen. | Loc. | PPL | s/edit | Rel@3 | Loc@3 | forced Rel | routed to holder"
        " | to an older memory | forced Gen | reph. routed to holder |"
    )
    assert all(line.count("|") == header.count("|") for line in lines if line.startswith("| zsre_train_0_T3 |"))
    assert len(result["single_edits"]["rows"]) == 2 and result["commit"]
    assert all(r["commit"] not in ("", "unknown") for r in rows)
    assert (tmp_path / "curves.png").stat().st_size > 0
    text = (tmp_path / "results.md").read_text()
    assert "### single edits (2)" in text and "| forced Rel | routed to holder | to an older memory |" in text
    with pytest.raises(SystemExit, match="DATA:START:NUM_EDITS"):
        Stream.parse("zsre:200")


def test_activation_overlap_compares_edits_with_and_without_the_shared_directions(tiny, zsre10):
    strategy = WISE(layer=TINY_LAYER)
    strategy.prepare(*tiny)
    requests = zsre10[:4]
    rows = overlap(strategy, requests, [0, 2])
    assert [r["directions_removed"] for r in rows] == [0, 2]
    assert all(-1 - 1e-6 <= r[k] <= 1 + 1e-6 for r in rows for k in r if k != "directions_removed")
    targets = [r.target for r in requests]
    edit = mean_activations(strategy, [r.prompt for r in requests], targets)
    rephrase = mean_activations(strategy, [r.rephrases[0] for r in requests], targets)
    own = torch.nn.functional.cosine_similarity(edit, rephrase).mean()
    assert rows[0]["own_rephrase"] == pytest.approx(float(own), abs=1e-5)
    assert rows[1]["own_rephrase"] != pytest.approx(rows[0]["own_rephrase"], abs=1e-4)


def test_soak_kills_and_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["--config", "configs/zsre_wise_retrieve.yaml", "--num-edits", "8", "--kills", "2", "--min-seconds", "4"]
    args += ["--max-seconds", "8", "--out", str(tmp_path), *TINY_WISE, "--model.strategy.edits_per_shard=1"]
    # every step of 200 per edit: the stream edits from about 5 s to 12 s here, so the kills land in it
    args += ["--model.strategy.n_iter=200", "--model.strategy.early_stop_loss=0"]
    result = soak(args)
    # a kill may come after the stream has finished editing (then it interrupts the scoring)
    assert 1 <= len(result["kills"]) <= 2 and result["uninterrupted"]["edits_done"] == 8
    assert result["same_scores"] and result["same_side_memories"]
    assert json.loads((tmp_path / "soak.json").read_text())["same_side_memories"] is True


def test_inference_overhead_times_runs_and_synthetic_memories_against_the_unedited_model(tmp_path):
    config = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    wise_cl(["fit", *config, *TINY_WISE, "--data.num_edits=3"])
    (run,) = tmp_path.glob("zsre_wise/version_*")
    rows = inference_overhead([run], [0, 4], "tiny", TINY_LAYER, num_prompts=4, new_tokens=2, repeats=1)
    served = json.loads((run / "metrics.json").read_text())["num_side_memories"]
    assert [(r["run"], r["edits"], r["side_memories"]) for r in rows] == [
        (str(run), 3, served),
        ("synthetic:0", None, 0),
        ("synthetic:4", None, 4),
    ]
    for row in rows:
        for name in ("scoring", "generation"):
            assert row[f"{name}_ratio"] == pytest.approx(row[f"{name}_seconds"] / row[f"unedited_{name}_seconds"])
            assert row[f"{name}_seconds"] > 0
    assert markdown(rows).count("\n") == 2 + len(rows)
    assert "route_agreement" not in rows[0]
    # two-stage routing: every memory on a 2-dimensional sketch, then one candidate scored exactly
    sketched = inference_overhead([run], [4], "tiny", TINY_LAYER, 4, 2, 1, sketch=(2, 1))
    assert 0.0 <= sketched[0]["route_agreement"] <= 1.0 and sketched[1]["side_memories"] == 4


def test_scale_up_reads_a_long_run_whose_curve_point_is_a_shorter_streams_final_model(tmp_path, monkeypatch):
    overlay = tmp_path / "curve_every_2.yaml"
    curve = {"class_path": "wise_cl.callbacks.ForgettingCurve", "init_args": {"every_n_edits": 2}}
    overlay.write_text(json.dumps({"trainer": {"callbacks": [curve]}}))  # YAML reads JSON
    args = [*TINY_WISE, "--model.strategy.edits_per_shard=1", f"--config={overlay}"]
    config = Path("configs/zsre_wise_retrieve.yaml")
    short = run_chunk(config, "retrieve", 2, 0, tmp_path / "short", args)
    run_chunk(config, "retrieve", 4, 0, tmp_path / "long", args)
    long_run = tmp_path / "long" / "tensorboard" / "retrieve" / "T4-chunk0"
    out = tmp_path / "scale_up"
    monkeypatch.setattr("sys.argv", ["scale_up", f"retrieve={long_run}", "--at", "2", "4", "--out", str(out)])
    scale_up()
    points = json.loads((out / "scale_up.json").read_text())["points"]["retrieve"]
    assert [(p["T"], p["scored"]) for p in points] == [(2, 2), (4, 4)]
    for metric in ("reliability", "generalization", "locality"):  # after 2 of 4 edits = a 2-edit stream's end
        assert points[0][metric] == pytest.approx(short[metric])
    assert (out / "scale_up.png").stat().st_size > 0 and "| retrieve | 4 | 4 |" in (out / "scale_up.md").read_text()


@pytest.mark.parametrize("config, layers", [("zsre_rome", 1), ("zsre_memit", 2)])
def test_weight_changes_measure_each_edited_layers_change_against_its_weight(config, layers, tmp_path):
    tiny = ["--model.model_name=tiny", "--model.exact_match=false", f"--model.strategy.layer={TINY_LAYER}"]
    settings = ["--model.strategy.n_iter=3", "--model.strategy.num_prefixes=0", "--model.strategy.corpus_tokens=32"]
    if config == "zsre_memit":
        settings.append("--model.strategy.num_layers=2")
    metrics = run_chunk(Path(f"configs/{config}.yaml"), config, 2, 0, tmp_path, tiny + settings)
    out = tmp_path / "weight_changes"
    weight_changes([str(tmp_path / "tensorboard" / config / "T2-chunk0"), "--out", str(out)])
    rows = json.loads((out / "weight_changes.json").read_text())["layers"]
    assert [row["layer"] for row in rows][-1] == TINY_LAYER and len(rows) == layers
    # the per-layer norms add up to the norm of all changes the run reported
    assert sum(row["change_norm"] ** 2 for row in rows) ** 0.5 == pytest.approx(metrics["tau_norm"], rel=1e-5)
    for row in rows:
        assert row["norm_ratio"] == pytest.approx(row["change_norm"] / row["weight_norm"])
        assert 0 < row["change_top_singular"] <= row["change_norm"] + 1e-6
    assert TINY_LAYER in (out / "weight_changes.md").read_text()
