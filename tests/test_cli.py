import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_WISE
from lightning.pytorch.callbacks import TQDMProgressBar

from wise_cl.cli import USER_ERRORS, main, run
from wise_cl.data import EditStreamDataModule, as_chat
from wise_cl.models import ModelLoadError, find_module, load_model
from wise_cl.records import EditDataError, read_requests
from wise_cl.rows import teacher_forced_batch
from wise_cl.strategies.wise import WISE


def run_cli(command, args, tmp_path, capsys):
    config = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main([command, *config, *TINY_WISE, *args])
    out = capsys.readouterr().out.strip().splitlines()
    path = Path(out[-1])
    assert path.name == "metrics.json" and path.is_file()
    return json.loads(path.read_text()), "\n".join(out)


def test_cli_test_scores_the_unedited_model(tmp_path, capsys):
    metrics, out = run_cli("test", ["--data.num_edits=4"], tmp_path, capsys)
    assert metrics["num_edits"] == 4 and metrics["locality"] == 1.0
    assert {"reliability", "generalization", "locality", "num_edits"} <= set(metrics)
    assert "reliability" in out


def test_cli_fit_edits_then_scores(tmp_path, capsys):
    metrics, _ = run_cli("fit", ["--data.num_edits=3"], tmp_path, capsys)
    assert metrics["edits_done"] == 3 and metrics["merge_method"] == "ties"
    assert metrics["num_side_memories"] == 1 and metrics["edit_seconds_median"] > 0
    assert metrics["edit_seconds_total"] >= metrics["edit_seconds_median"] and metrics["memory_seconds_total"] > 0
    # the result and the checkpoint say which code and which config made them
    assert len(metrics["commit"].removesuffix("+dirty")) == 40
    config = metrics["config"]
    assert config["data"]["num_edits"] == 3 and config["model"]["strategy"]["init_args"]["n_iter"] == 3
    (checkpoint,) = tmp_path.glob("**/checkpoints/last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["wise_cl"]["config"] == config
    run_folder = checkpoint.parent.parent  # one config file per run
    assert (run_folder / "config.yaml").is_file() and not (run_folder / "hparams.yaml").exists()


def test_editing_runs_with_the_run_long_objects_out_of_the_collector_s_reach(tmp_path, monkeypatch):
    frozen_while_editing = []
    edit = WISE.edit
    monkeypatch.setattr(
        WISE, "edit", lambda self, batch: frozen_while_editing.append(gc.get_freeze_count()) or edit(self, batch)
    )
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    run(["fit", *args, "--data.num_edits=2"])
    assert len(frozen_while_editing) == 2 and min(frozen_while_editing) > 10_000  # the model, tokenizer, stream
    assert gc.get_freeze_count() == 0  # given back to the collector when the fit ends


def test_progress_is_written_as_lines_without_a_terminal(tmp_path):
    # under pytest stdout is captured, as under nohup: Rich's bar would draw nothing there
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    cli = run(["test", *args, "--data.num_edits=1"])
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)


def test_help_offers_fit_test_and_predict(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out and "test" in out and "predict" in out and "validate" not in out


def test_output_has_no_lightning_tips_or_optimizer_warning(tmp_path, caplog, recwarn):
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    run(["fit", *args, "--data.num_edits=1"])
    assert "GPU available" in caplog.text and "Tip" not in caplog.text
    assert not [w for w in recwarn if "configure_optimizers" in str(w.message)]  # editing has no optimizer


def test_a_text_longer_than_the_context_is_refused_before_editing(tmp_path):
    record = {"src": "Q?", "alt": "A", "rephrase": "R?", "loc": "L", "loc_ans": "B"}
    path = tmp_path / "long.json"
    path.write_text(json.dumps([record, record | {"loc": "word " * 400}]))  # tiny model: 512 tokens
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    with pytest.raises(EditDataError, match=r"long.json, record 1, field 'locality_prompt': longer than .* 512"):
        run(["fit", *args, f"--data.path={path}", "--data.num_edits=2"])
    assert not list(tmp_path.glob("**/last.ckpt"))  # nothing was edited


def test_user_errors_are_two_lines_and_verbose_shows_the_traceback(tmp_path):
    config = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    for bad, message in (
        ("--model.strategy.lr=-5", "strategy.lr must be positive, got -5.0"),
        (f"--data.path={tmp_path / 'none.json'}", f"{tmp_path / 'none.json'}: file not found"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["fit", *config, bad])
        assert str(stop.value.code).splitlines() == [f"wise-cl: error: {message}", "(add --verbose for the traceback)"]
        with pytest.raises(USER_ERRORS):
            main(["fit", *config, bad, "--verbose"])


def test_ckpt_path_last_extends_the_stream_in_its_own_run_folder(tmp_path, capsys):
    first, _ = run_cli("fit", ["--data.num_edits=2"], tmp_path, capsys)
    longer, _ = run_cli("fit", ["--data.num_edits=3", "--ckpt_path=last"], tmp_path, capsys)
    assert (first["edits_done"], longer["edits_done"], longer["num_edits"]) == (2, 3, 3)
    assert [p.name for p in (tmp_path / "zsre_wise").iterdir()] == ["version_0"]
    (checkpoint,) = tmp_path.glob("zsre_wise/version_0/checkpoints/last.ckpt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short
    with pytest.raises(SystemExit, match=r"last.ckpt: damaged \(its SHA-256 differs"):
        main(
            [
                "fit",
                "--config",
                "configs/zsre_wise.yaml",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                *TINY_WISE,
                "--ckpt_path=last",
            ]
        )
    with pytest.raises(SystemExit, match="holds no"):
        main(
            [
                "fit",
                "--config",
                "configs/zsre_wise.yaml",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'x'}",
                *TINY_WISE,
                "--ckpt_path=last",
            ]
        )


def test_a_fit_is_refused_a_named_run_folder_that_holds_a_checkpoint(tmp_path, capsys):
    # rerunning a long run's command without --ckpt_path would start over on its checkpoint
    named = ["--data.num_edits=2", "--trainer.logger.init_args.version=T2"]
    run_cli("fit", named, tmp_path, capsys)
    checkpoint = tmp_path / "zsre_wise" / "T2" / "checkpoints" / "last.ckpt"
    saved = checkpoint.read_bytes()
    with pytest.raises(SystemExit, match=r"T2 already holds a run .*--ckpt_path last"):
        run_cli("fit", named, tmp_path, capsys)
    assert checkpoint.read_bytes() == saved
    run_cli("fit", ["--data.num_edits=1", "--trainer.logger.init_args.version=newer"], tmp_path, capsys)
    resumed, _ = run_cli("fit", [*named, "--ckpt_path=last"], tmp_path, capsys)  # its own, not the newest run's
    assert (
        resumed["edits_done"] == 2
        and (tmp_path / "zsre_wise" / "T2" / "metrics.json").stat().st_mtime
        > (tmp_path / "zsre_wise" / "newer" / "metrics.json").stat().st_mtime
    )


def test_a_checkpoint_is_scored_with_other_serving_settings_only(tmp_path, capsys):
    edited, _ = run_cli("fit", ["--data.num_edits=2", "--model.strategy.n_iter=20"], tmp_path, capsys)
    unedited, _ = run_cli("test", ["--data.num_edits=2"], tmp_path / "unedited", capsys)
    again = ["--data.num_edits=2", "--model.strategy.n_iter=20", "--ckpt_path=last"]
    rescored, _ = run_cli("test", again, tmp_path, capsys)
    assert rescored["reliability"] == edited["reliability"] != unedited["reliability"]
    # a routing threshold no sequence reaches: every sequence goes to the main memory, the unedited model
    unrouted, _ = run_cli("test", [*again, "--model.strategy.act_ratio=1e6"], tmp_path, capsys)
    assert unrouted["reliability"] == unedited["reliability"]
    with pytest.raises(SystemExit, match=r"other strategy settings \(saved, here\): \{'lr': \(8.0, 3.0\)\}"):
        run_cli("test", [*again, "--model.strategy.lr=3"], tmp_path, capsys)


def test_config_typo_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["test", "--config", "configs/zsre_wise.yaml", "--model.strategy.alhpa=3"])
    assert "alhpa" in capsys.readouterr().err


def test_unknown_model_and_layer_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model .*built-in names: smollm2-135m, tiny"):
        load_model(str(tmp_path / "no-such-model"))
    model, _ = load_model("tiny")
    with pytest.raises(LookupError, match="no module 'model.layers.9.mlp.down_proj'.*model.layers.0.mlp.down_proj"):
        find_module(model, "model.layers.9.mlp.down_proj")


def test_bad_stream_settings_are_named():
    with pytest.raises(ValueError, match="data.num_edits"):
        EditStreamDataModule(num_edits=0)


def test_chat_template_wraps_every_prompt_and_the_answer_follows_the_turn(tmp_path):
    _, tokenizer = load_model("tiny")
    with pytest.raises(ValueError, match="has no chat template"):
        as_chat(read_requests("zsre", limit=1), tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{{ '<assistant>\\n' }}"
    (request,) = as_chat(read_requests("zsre", limit=1), tokenizer)
    (plain,) = read_requests("zsre", limit=1)
    assert request.prompt == f"<user>{plain.prompt}\n<assistant>\n" and request.target == plain.target
    assert request.locality_prompt == f"<user>{plain.locality_prompt}\n<assistant>\n"
    assert request.rephrases == tuple(f"<user>{r}\n<assistant>\n" for r in plain.rephrases)
    batch = teacher_forced_batch(tokenizer, [request.prompt], [request.target])
    assert tokenizer.decode(batch.input_ids[0]).endswith(f"<assistant>\n{plain.target}")  # no space after the turn
    # through the CLI: the run records the option, and its stream is the chat one
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    with pytest.raises(SystemExit, match="has no chat template"):
        main(["test", *args, "--data.num_edits=1", "--data.chat_template=true"])


def test_stream_batches_follow_file_order():
    data = EditStreamDataModule("zsre", num_edits=5, edits_per_experience=2)
    data.setup()
    batches = list(data.test_dataloader())
    assert [b.indices for b in batches] == [[0, 1, 2, 3, 4]]
    data.eval_batch_size = 2
    assert [b.indices for b in data.test_dataloader()] == [[0, 1], [2, 3], [4]]


def test_wheel_installs_namespaced_packages(tmp_path):
    """The wheel ships wise_cl.strategies and wise_cl.benchmarks (with data), WISE's training texts, and
    no top-level `strategies`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        check=True,
    )
    import zipfile

    (wheel,) = tmp_path.glob("wise_cl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wise_cl/strategies/wise.py" in names and "wise_cl/benchmarks/data/zsre/zsre_mend_edit.json" in names
    assert {"wise_cl/resources/wise_loc_prompts.json", "wise_cl/resources/subjects.json"} <= set(names)
    assert not any(n.startswith(("strategies/", "benchmarks/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    check = (
        "import wise_cl.strategies.wise as w; from wise_cl.records import read_requests;"
        "from wise_cl.records import read_irrelevant_prompts, read_subjects;"
        "read_requests('zsre', limit=1); read_irrelevant_prompts(); read_subjects(); print(w.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(target))
    assert torch.__version__.startswith("2.14.1")


def test_memory_callbacks_run_before_the_forgetting_curve(tmp_path):
    # two one-edit shards merge at the last edit: the curve's last point must see the merged memory
    args = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}", *TINY_WISE]
    memory = ["--model.strategy.edits_per_shard=1", "--model.strategy.shards_per_merge=2"]
    cli = run(["fit", *args, *memory, "--data.num_edits=2"])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    last = json.loads((Path(cli.trainer.log_dir) / "forgetting_curve.json").read_text())[-1]
    assert last["edits"] == 2
    assert {k: last[k] for k in ("reliability", "locality")} == {k: metrics[k] for k in ("reliability", "locality")}
    assert last["perplexity"] == pytest.approx(metrics["perplexity"])  # the curve carries the target perplexity


def test_temporal_overlay_scores_out_of_distribution_generalization_along_the_stream(tmp_path):
    # any strategy's config plus the set's overlay; short requests of the temporal layout (the bundled texts are
    # longer than the tiny model's context)
    record = {"prompt": "Zorb is", "target_new": "a new fruit", "ood_rephrase": "Zorb, sold since 2024,"}
    record |= {"locality_prompt": "The sky is", "locality_ground_truth": "blue"}
    data = tmp_path / "temporal.json"
    data.write_text(json.dumps([record, record | {"prompt": "Quix is"}]))
    args = ["--config", "configs/zsre_wise.yaml", "--config", "configs/temporal.yaml", *TINY_WISE]
    cli = run(
        ["fit", *args, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.path={data}", "--data.num_edits=2"]
    )
    folder = Path(cli.trainer.log_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["model"]["exact_match"] is False and "generalization" not in metrics
    last = json.loads((folder / "forgetting_curve.json").read_text())[-1]
    assert last["ood_generalization"] == pytest.approx(metrics["ood_generalization"])


OVERLAYS = {  # config -> the config it goes after (any strategy's; these are ZsRE's)
    "configs/temporal.yaml": "configs/zsre_grace.yaml",
    "configs/hallucination.yaml": "configs/zsre_grace.yaml",
    "configs/long_stream.yaml": "configs/zsre_grace.yaml",
    "configs/long_stream_merge.yaml": "configs/zsre_wise.yaml",
    "configs/mass_resumable.yaml": "configs/zsre_memit_mass.yaml",
}


@pytest.mark.parametrize("config", sorted(str(path) for path in Path("configs").glob("*.yaml")))
def test_every_config_parses(config, capsys):
    configs = (["--config", OVERLAYS[config]] if config in OVERLAYS else []) + ["--config", config]
    with pytest.raises(SystemExit) as done:
        main(["fit", *configs, "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    # overlays that keep ZsRE
    leave_data = ("configs/long_stream.yaml", "configs/long_stream_merge.yaml", "configs/mass_resumable.yaml")
    data = "zsre" if config in leave_data else Path(config).stem.split("_")[0]
    assert f"path: {data}" in printed and "class_path: wise_cl.strategies." in printed
    assert config != "configs/mass_resumable.yaml" or "defer_update: true" in printed
    assert config != "configs/long_stream.yaml" or "max_requests: 500" in printed
    assert config != "configs/long_stream_merge.yaml" or "merge_retrain_pool: 200" in printed
