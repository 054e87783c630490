"""Using an edited model: routed greedy answers, `wise-cl predict`, export and `load_edited`."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYER, TINY_WISE

from wise_cl import answer_prompts, export_edited, load_edited
from wise_cl.cli import main
from wise_cl.models import find_module
from wise_cl.records import EditDataError, read_prompts, read_requests
from wise_cl.side_memory import attach_side_memory

PROMPTS = ["The capital of France is", "hello"]


def test_answers_come_from_the_memory_the_prompt_is_routed_to(tiny):
    model, tokenizer = tiny
    unedited = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=6)
    tau = torch.randn_like(find_module(model, TINY_LAYER).weight) * 0.5
    adapter = attach_side_memory(model, TINY_LAYER)
    adapter.serve([tau], [-1.0])  # every prompt passes the threshold
    routed = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=6)
    adapter.serve([tau], [1e9])  # no prompt passes it
    not_routed = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=6)
    adapter.serve([], [])
    with torch.no_grad():
        adapter.base.weight += tau  # the side memory's weights, unrouted
    merged = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert all("memory" not in a for a in unedited)  # no side memory at all
    assert [a["memory"] for a in routed] == [0, 0] and [a["memory"] for a in not_routed] == ["main", "main"]
    assert [a["answer"] for a in not_routed] == [a["answer"] for a in unedited]
    assert [a["answer"] for a in routed] == [a["answer"] for a in merged]
    assert [a["answer"] for a in routed] != [a["answer"] for a in unedited]


def test_answers_stop_at_the_end_of_the_first_line(tiny):
    model, tokenizer = tiny
    for answer in answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=32):
        assert "\n" not in answer["answer"] and answer["answer"] == answer["answer"].strip()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A WISE run of 3 edits on the tiny model: its folder and its requests."""
    save_dir = tmp_path_factory.mktemp("runs")
    config = ["--config", "configs/zsre_wise.yaml", f"--trainer.logger.init_args.save_dir={save_dir}"]
    main(["fit", *config, *TINY_WISE, "--data.num_edits=3"])
    (folder,) = save_dir.glob("zsre_wise/version_*")
    return folder, read_requests("zsre", limit=3)


def predict(folder, args, capsys):
    main(["predict", "--config", str(folder / "config.yaml"), *args])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.name == "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_answers_with_the_runs_checkpoint_and_export_loads_the_same_model(tiny_run, tmp_path, capsys):
    folder, requests = tiny_run
    config_before = (folder / "config.yaml").read_text()
    prompts = [r.prompt for r in requests] + ["An unrelated text"]
    args = ["--ckpt_path", str(folder / "checkpoints" / "last.ckpt")]
    answered = predict(folder, [*args, *(a for p in prompts for a in ("--prompt", p))], capsys)
    assert [a["prompt"] for a in answered] == prompts
    assert all(isinstance(a["answer"], str) and a["memory"] in ("main", 0) for a in answered)
    assert (folder / "config.yaml").read_text() == config_before  # predict leaves the run's record alone
    # the same prompts from a JSON Lines file give the same answers
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert predict(folder, [*args, f"--data.prompts={file}"], capsys) == answered

    exported = export_edited(folder, tmp_path / "edited")
    settings = json.loads((exported / "wise_cl.json").read_text())
    assert settings["base_model"] == "tiny" and settings["layer"] == TINY_LAYER and settings["edits"] == 3
    model, tokenizer = load_edited(exported)
    assert answer_prompts(model, tokenizer, prompts) == answered
    # and `predict` answers the same with the export instead of the checkpoint
    export_args = [f"--model.side_memories={exported}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert predict(folder, [*export_args, f"--data.prompts={file}"], capsys) == answered


def test_export_is_refused_for_a_folder_without_a_run(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["export", str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="not an export folder"):
        load_edited(tmp_path)


def test_bad_prompts_are_named(tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(EditDataError, match=r"prompts.jsonl, record 1, field 'prompt': missing field"):
        read_prompts(file)
    with pytest.raises(SystemExit, match="predict needs prompts"):
        main(["predict", "--config", "configs/zsre_wise.yaml", *TINY_WISE, f"--trainer.default_root_dir={tmp_path}"])


def test_side_memories_are_refused_for_fit(tmp_path):
    with pytest.raises(SystemExit, match="for `test` and `predict` only"):
        main(["fit", "--config", "configs/zsre_wise.yaml", *TINY_WISE, f"--model.side_memories={tmp_path}"])
