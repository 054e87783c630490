"""The options that make WISE follow the paper's official code (configs/zsre_wise_paper.yaml)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LAYER, TINY_WISE
from test_wise import edit_requests, small_wise

from wise_cl.cli import main
from wise_cl.editing_forward import CachedForward, FullForward
from wise_cl.models import load_model
from wise_cl.optimisation import optimise
from wise_cl.rows import teacher_forced_batch
from wise_cl.side_memory import MAIN, attach_side_memory, load_side_memories
from wise_cl.strategies.wise import WISE


def test_official_activation_loss_pairs_every_row_and_averages_violations_only():
    edit, irrelevant = torch.tensor([5.0, 1.0]), torch.tensor([0.0, 3.0])
    margins = dict(alpha=1.0, beta=4.0, gamma=2.0)
    # gaps irrelevant - edit + 2: [[-3, 1], [0, 4]] -> (1 + 4) / 2; irrelevant - 1: [-1, 2] -> 2; 4 - edit: [-1, 3] -> 3
    assert WISE(act_loss_form="official", **margins).activation_loss(edit, irrelevant).item() == pytest.approx(7.5)
    # the project's form: every edit row against the mean irrelevant score 1.5, hinges averaged over all rows
    assert WISE(**margins).activation_loss(edit, irrelevant).item() == pytest.approx(1.25 + 1.0 + 1.5)
    assert WISE(act_loss_form="official", **margins).activation_loss(torch.tensor([9.0]), torch.tensor([0.0])) == 0
    with pytest.raises(ValueError, match="act_loss_form"):
        WISE(act_loss_form="pairwise")


def test_weight_bound_clamps_every_entry_after_each_step():
    param = torch.zeros(4, requires_grad=True)
    optimise(lambda p: (p, p), param, lambda x, _: {"loss": -(x * torch.arange(4.0)).sum()}, 1.0, 3, bound=0.5)
    assert param.tolist() == [0.0, 0.5, 0.5, 0.5]


def test_weight_bound_keeps_the_side_memory_within_w_plus_minus_bound(tiny, zsre10):
    strategy = small_wise(lr=50.0, weight_bound=0.01)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:1])
    tau = strategy.memory.tau.detach()
    assert tau.abs().max().item() == pytest.approx(0.01)
    assert torch.all(tau[strategy.memory.mask == 0] == 0)


def test_threshold_rows_all_records_the_mean_score_over_an_edits_rows(tiny, zsre10):
    model, tokenizer = tiny
    strategy = small_wise(threshold_rows="all", score_context=True)
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, zsre10[:1])
    request = zsre10[0]
    prompts = [request.prompt] + [f"{context} {request.prompt}" for context in strategy.contexts]
    rows = teacher_forced_batch(tokenizer, prompts, [request.target] * len(prompts))
    scores = strategy._forward(rows).scores(strategy.memory.tau.detach())
    assert strategy.memory.shard_min_score == pytest.approx(scores.mean().item(), rel=1e-4)
    assert abs(scores.mean() - scores[0]) > 1e-3  # the plain row alone would give another threshold


@pytest.mark.parametrize("activation", [None, "silu"])
def test_cached_forward_equals_full_forward_with_an_activation_around_the_outputs(tiny, zsre10, activation):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    adapter.score_activation = activation
    rows = teacher_forced_batch(tokenizer, [zsre10[0].prompt, "unrelated text"], [zsre10[0].target, ""])
    tau = torch.randn(adapter.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    full, cached = FullForward(model, adapter, rows).scores(tau), CachedForward(model, adapter, rows, TINY_LAYER)
    torch.testing.assert_close(cached.scores(tau), full, rtol=1e-4, atol=1e-4)
    a = cached.full_activation()[1:, : int(rows.attention_mask[1].sum())]  # the unrelated row's real tokens
    expected = (
        F.linear(a, tau).norm(dim=-1)
        if activation is None
        else (F.silu(F.linear(a, adapter.weight + tau)) - F.silu(F.linear(a, adapter.weight))).norm(dim=-1)
    )
    torch.testing.assert_close(full[1], expected.mean(), rtol=1e-4, atol=1e-4)


def test_score_activation_is_the_models_and_travels_with_the_side_memories(tiny, zsre10, tmp_path):
    model, tokenizer = tiny
    strategy = small_wise(score_activation=True, keep_route=False)
    strategy.prepare(model, tokenizer)
    assert strategy.adapter.score_activation == model.config.hidden_act == "silu"
    edit_requests(strategy, zsre10[:1])
    strategy.save_side_memories(tmp_path / "side.safetensors")
    fresh, _ = load_model("tiny")
    adapter = load_side_memories(fresh, tmp_path / "side.safetensors")
    assert adapter.score_activation == "silu" and adapter.reroute_each_token


def test_without_keep_route_every_generated_token_is_routed_again(tiny):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    adapter.serve([torch.full_like(adapter.weight, 0.01)], [0.0])
    adapter.reroute_each_token = True
    routes = []

    def record_then_raise_threshold(module, args, out):
        routes.append(module.route.tolist())
        module.thresholds = [1e9]  # every token routed after the prompt now goes to the main memory

    handle = adapter.register_forward_hook(record_then_raise_threshold)
    inputs = tokenizer(["hello"], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    assert routes == [[0], [MAIN], [MAIN]]


def test_official_contexts_are_greedy_continuations_of_five_seeds_at_5_then_10_tokens(tiny):
    def contexts(**options) -> list[str]:
        strategy = small_wise(num_context=7, **options)
        strategy.prepare(*tiny)
        return strategy.generate_contexts()

    official = contexts(context_style="official", seed=3)
    assert official == contexts(context_style="official", seed=4)  # greedy: no seed enters
    seeds = ["I", "You", "Because", "Yes", "Q:", "I", "You"]
    assert all(text.startswith(seed) for text, seed in zip(official, seeds, strict=True))
    assert official[5].startswith(official[0]) and len(official[5]) > len(official[0])  # 10 tokens, then 5
    assert contexts(seed=3) != contexts(seed=4)  # the project's prefixes are sampled
    with pytest.raises(ValueError, match="context_style"):
        WISE(context_style="greedy")


def test_the_paper_config_edits_and_scores(tmp_path, capsys):
    config = ["--config", "configs/zsre_wise_paper.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", *config, *TINY_WISE, "--data.num_edits=2"])
    (checkpoint,) = tmp_path.glob("**/checkpoints/last.ckpt")
    strategy = torch.load(checkpoint, weights_only=False)["wise_cl"]["config"]["model"]["strategy"]["init_args"]
    assert strategy["act_loss_form"] == "official" and strategy["keep_route"] is False
    assert "reliability" in capsys.readouterr().out
