import dataclasses
import io
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LAYER
from lightning.pytorch.callbacks import TQDMProgressBar
from safetensors.torch import save_file

from wise_cl import checkpoints, key_statistics
from wise_cl.callbacks import EditCheckpoint, ForgettingCurve, request_scores
from wise_cl.data import EditBatch, EditStreamDataModule
from wise_cl.editing_forward import CachedForward, FullForward
from wise_cl.evaluation import predict_answers
from wise_cl.merging import merge_task_vectors
from wise_cl.models import load_model
from wise_cl.module import EditingModule
from wise_cl.provenance import file_sha256
from wise_cl.rows import teacher_forced_batch
from wise_cl.serving import answer_prompts
from wise_cl.side_memory import (
    MAIN,
    attach_side_memory,
    detach_side_memory,
    load_side_memories,
    route,
    save_side_memories,
)
from wise_cl.strategies.wise import WISE


def small_wise(**overrides) -> WISE:
    config = dict(
        layer=TINY_LAYER,
        n_iter=15,
        num_context=2,
        context_length=4,
        edits_per_shard=2,
        shards_per_merge=2,
        alpha=0.5,
        beta=3.0,
        gamma=2.0,
        lr=2.0,
    )
    return WISE(**(config | overrides))


def edit_requests(strategy, requests, start=0, lifecycle=False):
    """Edit one request at a time; with `lifecycle`, run the memory callbacks after each, as the Trainer does."""
    for i, request in enumerate(requests, start):
        strategy.edit(EditBatch([i], [request]))
        for callback in strategy.callbacks() if lifecycle else []:
            callback.after_edit(strategy)


def test_masked_gradient_leaves_entries_outside_the_shard_untouched(tiny, zsre10):
    strategy = small_wise()
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:1])
    tau = strategy.memory.tau.detach()
    assert tau.abs().sum() > 0
    assert torch.all(tau[strategy.memory.mask == 0] == 0)
    assert 0.15 < strategy.memory.mask.mean().item() < 0.25


def test_edit_raises_target_probability_and_records_threshold(tiny, zsre10):
    model, tokenizer = tiny
    request = zsre10[0]
    before = predict_answers(model, tokenizer, [request.prompt], [request.target]).nll.mean()
    strategy = small_wise()
    strategy.prepare(model, tokenizer)
    stats = strategy.edit(EditBatch([0], [request]))
    after = predict_answers(model, tokenizer, [request.prompt], [request.target]).nll.mean()
    assert after < before - 1.0
    assert stats["steps"] >= 1
    assert len(strategy.adapter.thresholds) == 1 and strategy.adapter.thresholds[0] > 0


def test_ties_merge_matches_hand_computed_example():
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-1.0, 4.0, -0.25, 2.0])
    # trim to density 0.5: t1 -> [3, 0, 0, 2], t2 -> [0, 4, 0, 2]; signs: +, +, 0, +;
    # disjoint mean over agreeing non-zero entries: [3, 4, 0, 2]
    merged = merge_task_vectors([t1, t2], "ties", density=0.5)
    assert merged.tolist() == [3.0, 4.0, 0.0, 2.0]
    # sign election is weighted: a heavier t2 flips entry 0 to t2's sign
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0])
    assert merge_task_vectors([a, b], "ties", density=1.0, weights=[1.0, 3.0]).tolist() == [-1.0, 1.0]
    assert merge_task_vectors([t1, t2], "linear").tolist() == [1.0, 1.5, 0.125, 2.0]


def test_dare_rescales_kept_entries():
    tau = torch.ones(10_000)
    merged = merge_task_vectors([tau], "dare", density=0.5, seed=1)
    assert set(merged.unique().tolist()) == {0.0, 2.0}
    assert merged.mean().item() == pytest.approx(1.0, abs=0.05)


def test_routing_is_decided_per_sequence(tiny):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    tau = torch.zeros_like(adapter.weight)
    tau[:, :8] = 5.0  # large only along a few input features
    adapter.taus, adapter.thresholds = [tau], [1.0]
    batch = teacher_forced_batch(tokenizer, ["aaaa", "zzzzzzzz"], ["b", "c"])
    captured = []
    handle = adapter.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    scores = adapter.scores(captured[0])[0]
    adapter.thresholds = [float(scores.mean())]  # between the two sequences' scores
    assert scores[0] != scores[1]
    model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    high = int(scores.argmax())
    assert adapter.route.tolist() == [0 if i == high else MAIN for i in range(2)]
    # each row's output equals its output when run alone
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for i in range(2):
        length = int(batch.attention_mask[i].sum())
        alone = model(input_ids=batch.input_ids[i : i + 1, :length]).logits
        torch.testing.assert_close(full[i, :length], alone[0], rtol=1e-4, atol=1e-4)


def test_sketched_routing_picks_the_exact_route_scoring_only_the_candidates(tiny, tmp_path):
    model, _ = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    out_features, in_features = adapter.weight.shape
    generator = torch.Generator().manual_seed(0)
    block = in_features // 12
    taus = []
    for m in range(12):  # memory m reads input features of block m only
        tau = torch.zeros(out_features, in_features)
        tau[:, m * block : (m + 1) * block] = torch.randn(out_features, block, generator=generator)
        taus.append(tau)
    a = torch.randn(6, 5, in_features, generator=generator) * 0.1
    for b in range(6):  # sequence b is loud on block 2b
        a[b, :, 2 * b * block : (2 * b + 1) * block] += 1.0
    adapter.serve(taus, [0.0] * 12)
    exact = adapter.decide_route(a)
    assert exact.tolist() == [0, 2, 4, 6, 8, 10]

    adapter.use_sketch(sketch_dim=8, candidates=2)
    scored_rows = []
    distances = adapter.distances
    adapter.distances = lambda rows, *rest: scored_rows.append(len(rows)) or distances(rows, *rest)
    assert torch.equal(adapter.decide_route(a), exact)
    assert sum(scored_rows) <= 6 * 2 < 6 * 12  # exact scores for each sequence's two candidates only
    del adapter.distances

    save_side_memories(adapter, tmp_path / "side.safetensors", TINY_LAYER)
    fresh = load_side_memories(load_model("tiny")[0], tmp_path / "side.safetensors")
    assert (fresh.sketch_dim, fresh.candidates) == (8, 2)
    torch.testing.assert_close(fresh.sketches, adapter.sketches)
    adapter.use_sketch(sketch_dim=8, candidates=12)  # as many candidates as memories: no sketch needed
    assert adapter.sketches is None and torch.equal(adapter.decide_route(a), exact)


def test_wise_retrieve_routes_its_memories_through_the_sketch(tiny, zsre10):
    strategy = small_wise(retrieve=True, edits_per_shard=1, shards_per_merge=1, route_sketch=4, route_candidates=1)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:3], lifecycle=True)
    adapter = strategy.adapter
    frozen = adapter.sketches[:4].clone()
    edit_requests(strategy, zsre10[3:4], start=3, lifecycle=True)
    assert len(adapter.taus) >= 3 and adapter.sketches.shape == (4 * len(adapter.taus), adapter.weight.shape[1])
    assert torch.equal(adapter.sketches[:4], frozen)  # a frozen memory keeps its sketch


def test_generation_keeps_the_route_decided_on_the_prompt(tiny):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    adapter.serve([torch.full_like(adapter.weight, 0.01)], [0.0])
    routes = []

    def record_then_raise_threshold(module, args, out):
        routes.append(module.route.tolist())
        module.thresholds = [1e9]  # a route decided anew after the prompt would now be the main memory

    handle = adapter.register_forward_hook(record_then_raise_threshold)
    inputs = tokenizer(["hello"], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    assert routes == [[0], [0], [0]]
    routes.clear()  # a new prompt is routed anew: under the raised threshold, to the main memory
    handle = adapter.register_forward_hook(lambda m, args, out: routes.append(m.route.tolist()))
    model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    handle.remove()
    assert routes == [[MAIN], [MAIN], [MAIN]]


def test_prompt_mask_covers_the_prompt_tokens_only(tiny):
    _, tokenizer = tiny
    for side in ("right", "left"):
        rows = teacher_forced_batch(tokenizer, ["ab", "abcdef"], ["xyz", "q"], padding_side=side)
        mask = rows.prompt_mask()
        prompt_lengths = [len(tokenizer("ab")["input_ids"]), len(tokenizer("abcdef")["input_ids"])]
        assert mask.sum(1).tolist() == prompt_lengths
        for row in range(2):  # the prompt's tokens are the row's first real ones
            real = rows.attention_mask[row].nonzero().squeeze(1)
            assert mask[row, real[: prompt_lengths[row]]].all()


def test_routing_on_the_prompt_gives_teacher_forcing_the_route_generation_takes(tiny, zsre10):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    adapter.serve([torch.randn_like(adapter.weight) * 0.1], [0.0])
    routes = []
    handle = adapter.register_forward_hook(lambda m, args, out: routes.append(m.route.tolist()))
    prompts, targets = [r.prompt for r in zsre10], [r.target for r in zsre10]
    activations = []  # each prompt's activation at the layer, the prompt alone (as generation starts)
    hook = adapter.register_forward_pre_hook(lambda m, args: activations.append(args[0]))
    for prompt in prompts:
        model(**tokenizer([prompt], return_tensors="pt"))
    hook.remove()
    adapter.token_mask = None
    prompt_scores = [float(adapter.scores(a)[0, 0]) for a in activations]
    threshold = sorted(prompt_scores)[len(prompts) // 2]
    adapter.serve(adapter.taus, [threshold])
    adapter.route_on_prompt = True
    routes.clear()
    predict_answers(model, tokenizer, prompts, targets, chunk_rows=len(prompts))
    handle.remove()
    by_prompt = [0 if score > threshold else MAIN for score in prompt_scores]
    (teacher_forced,) = routes
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + 2 * len(targets[i]))  # predict's row order
    assert [teacher_forced[order.index(i)] for i in range(len(prompts))] == by_prompt
    assert 0 < by_prompt.count(MAIN) < len(prompts)


def test_wise_routing_on_the_prompt_routes_teacher_forcing_and_generation_alike(tiny, zsre10):
    model, tokenizer = tiny
    strategy = small_wise(route_on="prompt")
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, zsre10[:2])
    prompts = [r.prompt for r in zsre10[:6]]
    routes = []
    handle = strategy.adapter.register_forward_hook(lambda m, args, out: routes.append(m.route.tolist()))
    for prompt, target in zip(prompts, [r.target for r in zsre10[:6]], strict=True):
        predict_answers(model, tokenizer, [prompt], [target])
    handle.remove()
    generated = [a["memory"] for a in answer_prompts(model, tokenizer, prompts, max_new_tokens=2)]
    assert [MAIN if m == "main" else m for m in generated] == [route for (route,) in routes]
    assert strategy.memory.shard_min_score > 0  # the edits' prompts, scored alone, reached the memory


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("merge_method", "average", "one of .*ties"),
        ("early_stop_on", "steps", "one of loss, edit_loss"),
        ("route_on", "tokens", "one of sequence, prompt"),
        ("mask_ratio", 0.0, r"in \(0, 1\]"),
        ("merge_density", 1.5, r"in \(0, 1\]"),
        ("calibration_quantile", 0.0, r"in \(0, 1\]"),
        ("edits_per_shard", 0, "at least 1"),
        ("shards_per_merge", 0, "at least 1"),
        ("n_iter", 0, "at least 1"),
        ("num_irrelevant", 0, "at least 1"),
        ("context_length", 0, "at least 1"),
        ("lr", -5.0, "positive"),
        ("act_ratio", -1.0, "positive"),
        ("prior_merge_weight", 0.0, "positive"),
        ("alpha", -1.0, "at least 0"),
        ("act_loss_weight", -0.1, "at least 0"),
        ("early_stop_loss", -1.0, "at least 0"),
        ("replay", -1, "at least 0"),
        ("rival_margin", -1, "at least 0"),
        ("consolidate_steps", -1, "at least 0"),
        ("merge_consolidate_steps", -1, "at least 0"),
        ("merge_retrain_edits", -1, "at least 0"),
        ("merge_retrain_pool", -1, "at least 0"),
        ("calibration_texts", -1, "at least 0"),
        ("shared_directions", -1, "at least 0"),
        ("subject_negatives", -1, "at least 0"),
        ("route_sketch", -1, "at least 0"),
        ("route_candidates", 0, "at least 1"),
        ("num_context", 11, r"in \[0, 10\]"),
        ("retrain_contexts", 11, r"in \[0, num_context=10\]"),
        ("negative_choice", "closest", "one of random, nearest"),
    ],
)
def test_every_bad_wise_option_is_refused_with_its_name(option, value, expected):
    with pytest.raises(ValueError, match=rf"strategy\.{option} must be {expected}, got"):
        WISE(**{option: value})


@pytest.mark.parametrize("callback", [EditCheckpoint, ForgettingCurve])
def test_callbacks_refuse_a_zero_interval(callback):
    with pytest.raises(ValueError, match=rf"trainer\.callbacks\.{callback.__name__}\.every_n_edits must be at least 1"):
        callback(every_n_edits=0)


def test_detach_restores_outputs_bit_for_bit(tiny, zsre10):
    model, tokenizer = tiny
    inputs = tokenizer([zsre10[0].prompt], return_tensors="pt")
    before = model(**inputs).logits.clone()
    strategy = small_wise()
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, zsre10[:2])
    strategy.detach()
    assert torch.equal(model(**inputs).logits, before)


def test_cached_forward_equals_full_forward(tiny, zsre10):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    # score-only rows of very different lengths run in their own chunks, cut to their own columns
    long_text = " ".join(["a long unrelated text"] * 12)
    prompts = [zsre10[0].prompt, "I " + zsre10[0].prompt, "unrelated", long_text]
    rows = teacher_forced_batch(tokenizer, prompts, [zsre10[0].target] * 2 + ["", ""])
    grads = []
    for forward in (FullForward(model, adapter, rows), CachedForward(model, adapter, rows, TINY_LAYER)):
        tau = (torch.randn(adapter.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05).requires_grad_()
        logits, scores = forward(tau)
        (logits.logsumexp(-1).sum() + scores.sum()).backward()
        grads.append((logits, scores, tau.grad))
    for full, cached in zip(*grads, strict=True):
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_cached_forward_reuses_score_only_rows_from_the_memo(tiny, zsre10):
    model, tokenizer = tiny
    adapter = attach_side_memory(model, TINY_LAYER)
    tau = torch.randn_like(adapter.weight) * 0.05
    memo = {}
    first = teacher_forced_batch(
        tokenizer, [zsre10[0].prompt, "an old prompt", "a kept prompt"], [zsre10[0].target, "", ""]
    )
    scores_first = CachedForward(model, adapter, first, TINY_LAYER, memo=memo).scores(tau)
    kept = tuple(tokenizer("a kept prompt")["input_ids"])
    assert len(memo) == 2 and kept in memo
    memo[kept] = memo[kept] * 2  # a doctored entry shows the next edit reads the memo instead of the model
    second = teacher_forced_batch(tokenizer, [zsre10[1].prompt, "a kept prompt", "new"], [zsre10[1].target, "", ""])
    scores_second = CachedForward(model, adapter, second, TINY_LAYER, memo=memo).scores(tau)
    torch.testing.assert_close(scores_second[1], 2 * scores_first[2])
    assert set(memo) == {kept, tuple(tokenizer("new")["input_ids"])}


def test_early_stop_can_watch_the_editing_loss_alone(tiny, zsre10):
    # the edit loss of a random tiny model is far above 0.5 but under 1e3; the total adds an
    # activation loss that margins of 1e6 keep above 1e3
    settings = dict(early_stop_loss=1e3, alpha=0.0, beta=1e6, gamma=1e6, act_loss_weight=1.0)
    steps = {}
    for stop_on in ("loss", "edit_loss"):
        strategy = small_wise(early_stop_on=stop_on, **settings)
        strategy.prepare(*tiny)
        steps[stop_on] = strategy.edit(EditBatch([0], [zsre10[0]]))["steps"]
        strategy.detach()
    assert steps == {"loss": 15, "edit_loss": 1}
    with pytest.raises(ValueError, match="early_stop_on"):
        small_wise(early_stop_on="edit")


def test_shards_merge_and_retrieve_spawn(tiny, zsre10):
    strategy = small_wise(retrieve=True)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:4], lifecycle=True)
    # 4 edits, 2 per shard, 2 shards per merge -> one frozen memory, an empty active one
    assert len(strategy.memory.frozen) == 1 and strategy.memory.merged is None
    assert len(strategy.adapter.taus) == 1 and strategy.memory.shard_index == 2
    # random subspaces of 20% of the entries: another shard of the group may change about 20% of a shard's
    assert strategy.describe()["subspace_overlap"] == pytest.approx(0.2, abs=0.03)


def test_a_retrieve_memory_takes_its_merges_before_it_is_frozen(tiny, zsre10):
    strategy = small_wise(retrieve=True, edits_per_shard=1, shards_per_merge=1, merges_per_memory=3, n_iter=2)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    # two merges of one shard each: still the memory under edit, holding both edits, nothing frozen
    assert not strategy.memory.frozen and len(strategy.memory.edits) == 2
    merged = strategy.memory.merged.clone()
    edit_requests(strategy, zsre10[2:4], start=2, lifecycle=True)
    # the third merge completes it: frozen with all three edits' merge, the fourth edit opens the next memory
    assert len(strategy.memory.frozen) == 1 and [e.prompt for e in strategy.memory.edits] == [zsre10[3].prompt]
    assert not torch.equal(strategy.memory.frozen[0].tau, merged)
    with pytest.raises(ValueError, match="merges_per_memory"):
        small_wise(merges_per_memory=2)


def test_open_shard_serves_next_to_the_closed_part_with_its_own_threshold(tiny, zsre10):
    strategy = small_wise(edits_per_shard=2, shards_per_merge=2, n_iter=4)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    # right after shard 0 closes, it serves alone (the emptied open shard does not)
    (served,) = strategy.adapter.taus
    torch.testing.assert_close(served, strategy.memory.shards[0])
    edit_requests(strategy, zsre10[2:3], start=2, lifecycle=True)
    # shard 0 (edits 0-1) is closed and not merged yet; shard 1 holds edit 2 and is not merged into it
    closed, open_shard = strategy.adapter.taus
    torch.testing.assert_close(closed, strategy.memory.shards[0])
    torch.testing.assert_close(open_shard, strategy.memory.tau.detach())
    # the open shard's threshold comes from its own edit, scored right after training
    (score,) = strategy.edit_scores(open_shard, strategy.memory.shard_edits).tolist()
    assert strategy.memory.shard_min_score == pytest.approx(score, rel=1e-4)
    scores = (strategy.memory.closed_min_score, strategy.memory.shard_min_score)
    assert strategy.adapter.thresholds == [pytest.approx(strategy.act_ratio * score) for score in scores]


def test_route_with_answers_goes_to_the_answer_of_the_memory_past_its_threshold_by_the_most():
    scores = torch.tensor([[5.0, 1.0, 3.0], [3.0, 1.0, 1.0], [9.0, 9.0, 9.0]])  # [memories, sequences]
    thresholds = torch.tensor([10.0, 2.0, float("inf")])
    # the highest score (5.0, memory 0) misses its threshold, memory 1 passes its own: routed to its answer
    assert route(scores, thresholds).tolist() == [MAIN, MAIN, MAIN]
    assert route(scores, thresholds, answers=[2, 2, 2]).tolist() == [2, MAIN, MAIN]
    # the answer-only memory (threshold inf) is never routed on its own scores, however high
    assert route(scores, thresholds, answers=[0, 1, 2]).tolist() == [1, MAIN, MAIN]


def test_shard_routers_route_to_the_merged_memory_which_answers_for_them(tiny, zsre10, tmp_path):
    model, tokenizer = tiny
    strategy = small_wise(edits_per_shard=2, shards_per_merge=1, n_iter=4, shard_routers=True)
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, zsre10[:5], lifecycle=True)
    memory, adapter = strategy.memory, strategy.adapter
    # two closed shards (edits 0-3) route, the open shard (edit 4) answers itself, the merged memory answers for both
    assert len(memory.routers) == 2 and len(adapter.taus) == 4
    assert memory.replay_prompts == [r.prompt for r in zsre10[:4]]  # the routers' edits, for `replay`
    assert adapter.answers == [3, 3, 2, 3] and adapter.thresholds[3] == float("inf")
    torch.testing.assert_close(adapter.taus[3], memory.merged)
    torch.testing.assert_close(adapter.taus[0], memory.routers[0].tau)
    (score,) = strategy.edit_scores(memory.routers[1].tau, [memory.edits[2]]).tolist()
    assert adapter.thresholds[1] <= strategy.act_ratio * score + 1e-4  # a router's threshold: its own edits' scores
    inputs = tokenizer([r.prompt for r in zsre10[:5]], return_tensors="pt", padding=True)
    edited = model(**inputs).logits
    assert set(adapter.route.tolist()) <= {MAIN, 2, 3}  # nothing is answered by a router's own task vector
    # two-stage routing: the merged memory, which only answers, never takes a candidate's place
    adapter.use_sketch(8, 1)
    candidates = adapter.candidate_scores(torch.randn(6, 3, adapter.weight.shape[1]))
    assert candidates[3].isneginf().all() and candidates[:3].isfinite().any(0).all()
    adapter.use_sketch(0, 1)
    # the routers, the answers and the routing rule travel with the side-memory file
    strategy.save_side_memories(tmp_path / "side.safetensors")
    fresh, _ = load_model("tiny")
    loaded = load_side_memories(fresh, tmp_path / "side.safetensors")
    assert loaded.answers == adapter.answers and loaded.thresholds == adapter.thresholds
    torch.testing.assert_close(fresh(**inputs).logits, edited)
    # and with the strategy's state (a checkpoint): the same routers, thresholds and answers
    restored = small_wise(edits_per_shard=2, shards_per_merge=1, n_iter=4, shard_routers=True)
    restored.prepare(model, tokenizer)
    restored.load_state_dict(strategy.state_dict())
    assert restored.adapter.answers == adapter.answers and restored.adapter.thresholds == adapter.thresholds
    with pytest.raises(ValueError, match="shard_routers"):
        small_wise(retrieve=True, shard_routers=True)


def test_merge_retraining_of_new_entries_leaves_the_older_shards_entries_as_merged(tiny, zsre10):
    strategy = small_wise(shards_per_merge=1, merge_consolidate_steps=3, merge_retrain_entries="new")
    strategy.prepare(*tiny)
    merged_before_retraining = []
    merge = strategy.memory.merge
    strategy.memory.merge = lambda: merge() or merged_before_retraining.append(strategy.memory.merged.clone())
    edit_requests(strategy, zsre10[:4], lifecycle=True)  # shards of 2 edits: the second merge is at edit 4
    moved = strategy.memory.merged != merged_before_retraining[-1]
    assert moved.any() and not (moved & (strategy.memory.shard_mask(1) == 0)).any()
    with pytest.raises(ValueError, match="merge_retrain_entries"):
        small_wise(merge_retrain_entries="old")


def test_side_memories_save_and_load_round_trip(tiny, zsre10, tmp_path):
    model, tokenizer = tiny
    strategy = small_wise()
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, zsre10[:3])
    inputs = tokenizer([r.prompt for r in zsre10[:3]], return_tensors="pt", padding=True)
    edited = model(**inputs).logits
    strategy.save_side_memories(tmp_path / "side.safetensors")

    fresh, _ = load_model("tiny")
    adapter = load_side_memories(fresh, tmp_path / "side.safetensors")
    assert adapter.thresholds == strategy.adapter.thresholds
    torch.testing.assert_close(fresh(**inputs).logits, edited)
    detach_side_memory(fresh, TINY_LAYER)
    # a file that is not one, a NaN memory and a wrong shape are refused with the path named
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors: not a side-memory file"):
        load_side_memories(fresh, path)
    for tau in (torch.full_like(strategy.adapter.taus[0], float("nan")), torch.zeros(3, 3)):
        save_file({"tau.0": tau}, str(path), metadata={"layer": TINY_LAYER, "thresholds": "[1.0]"})
        with pytest.raises(ValueError, match="bad.safetensors: tau.0 is not a finite"):
            load_side_memories(fresh, path)


class StopAfter(L.Callback):
    def __init__(self, edits: int) -> None:
        self.edits = edits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.edits_done == self.edits:
            raise KeyboardInterrupt  # a killed run


def run_stream(tmp_path, callbacks, ckpt_path=None, num_edits=5, start=0, **settings):
    torch.manual_seed(0)
    module = EditingModule("tiny", small_wise(n_iter=4, **settings), exact_match=False)
    checkpoint = EditCheckpoint(dirpath=str(tmp_path))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[checkpoint, *callbacks],
        enable_progress_bar=any(isinstance(callback, TQDMProgressBar) for callback in callbacks),
        default_root_dir=str(tmp_path),  # where a forgetting curve is written
    )
    trainer.fit(module, EditStreamDataModule("zsre", num_edits=num_edits, start=start), ckpt_path=ckpt_path)
    return module


def test_a_resumed_stream_shows_its_progress_against_the_whole_stream(tmp_path):
    with pytest.raises(SystemExit):
        run_stream(tmp_path, [StopAfter(3)])
    bar = TQDMProgressBar()
    run_stream(tmp_path, [bar], ckpt_path=tmp_path / "last.ckpt")
    # Lightning skips the epoch-start hook on a resume mid-epoch, which left the bar at "Training: 5/?"
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n, bar.train_progress_bar.desc) == (5, 5, "Epoch 0: ")


def test_a_stopped_stream_has_its_forgetting_curve_so_far(tmp_path):
    curve = ForgettingCurve(every_n_edits=1)
    with pytest.raises(SystemExit):
        run_stream(tmp_path, [curve, StopAfter(2)])
    written = json.loads((tmp_path / "forgetting_curve.json").read_text())
    assert [point["edits"] for point in written] == [1, 2] and written == curve.history
    assert (tmp_path / "forgetting_curve.png").stat().st_size > 0


@pytest.mark.parametrize("settings", [{}, {"shards_per_merge": 1, "shard_routers": True}], ids=["merge", "routers"])
def test_checkpoint_kill_and_resume_gives_the_same_side_memory(tmp_path, settings):
    whole = run_stream(tmp_path / "whole", [], **settings)
    with pytest.raises(SystemExit):
        run_stream(tmp_path / "killed", [StopAfter(3)], **settings)
    resumed = run_stream(tmp_path / "killed", [], ckpt_path=tmp_path / "killed" / "last.ckpt", **settings)
    assert resumed.edits_done == whole.edits_done == 5
    assert len(resumed.edit_seconds) == 5
    assert torch.equal(resumed.strategy.memory.tau, whole.strategy.memory.tau)
    for a, b in zip(resumed.strategy.memory.shards, whole.strategy.memory.shards, strict=True):
        assert torch.equal(a, b)
    assert resumed.strategy.adapter.thresholds == whole.strategy.adapter.thresholds
    assert resumed.strategy.adapter.answers == whole.strategy.adapter.answers
    for a, b in zip(resumed.strategy.adapter.taus, whole.strategy.adapter.taus, strict=True):
        assert torch.equal(a, b)
    if settings:  # two routers (edits 0-3), each written once beside the checkpoint
        assert sorted(p.name for p in (tmp_path / "killed" / "routers").iterdir()) == [
            "00000.safetensors",
            "00001.safetensors",
        ]


def test_the_activation_memo_survives_a_checkpoint(tiny, zsre10):
    # activations recomputed in another batch differ in the last bits: a resumed run must reuse the saved ones
    strategy = small_wise(n_iter=2)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2])
    assert strategy.activation_memo
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    restored = small_wise(n_iter=2)
    restored.prepare(*load_model("tiny"))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.activation_memo.keys() == strategy.activation_memo.keys()
    assert all(torch.equal(restored.activation_memo[k], v) for k, v in strategy.activation_memo.items())


def test_frozen_memories_are_written_once_beside_the_checkpoint(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(checkpoints, "save_file", lambda tensors, path: writes.append(path) or save_file(tensors, path))
    retrieve = {"retrieve": True, "edits_per_shard": 1, "shards_per_merge": 1}  # a memory frozen at every edit
    whole = run_stream(tmp_path / "whole", [], **retrieve)
    assert len(whole.strategy.memory.frozen) == 5 and len(writes) == 5  # not 1 + 2 + ... + 5
    saved = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)["wise_cl"]["strategy"]["frozen"]
    assert [item["file"] for item in saved] == [f"frozen/{i:05d}.safetensors" for i in range(5)]
    with pytest.raises(SystemExit):
        run_stream(tmp_path / "killed", [StopAfter(3)], **retrieve)
    frozen_file = tmp_path / "killed" / "frozen" / "00001.safetensors"
    intact = frozen_file.read_bytes()
    frozen_file.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"killed/frozen/00001.safetensors: damaged"):
        run_stream(tmp_path / "killed", [], ckpt_path=tmp_path / "killed" / "last.ckpt", **retrieve)
    frozen_file.write_bytes(intact)
    resumed = run_stream(tmp_path / "killed", [], ckpt_path=tmp_path / "killed" / "last.ckpt", **retrieve)
    for a, b in zip(resumed.strategy.memory.frozen, whole.strategy.memory.frozen, strict=True):
        assert torch.equal(a.tau, b.tau) and a.min_score == b.min_score
    assert resumed.strategy.adapter.thresholds == whole.strategy.adapter.thresholds


def test_a_checkpoint_resumes_only_its_own_stream_and_extends_it(tmp_path):
    run_stream(tmp_path / "short", [ForgettingCurve(every_n_edits=1)], num_edits=3)
    checkpoint = tmp_path / "short" / "last.ckpt"
    for other, reason in (
        ({"start": 1}, "start 0, here 1"),
        ({"lr": 3.0}, r"other strategy settings \(saved, here\): \{'lr': \(2.0, 3.0\)\}"),
        ({"num_edits": 2}, "holds 3 edits, more than data.num_edits=2"),
    ):
        with pytest.raises(ValueError, match=rf"last.ckpt: .*{reason}"):
            run_stream(tmp_path / "other", [], ckpt_path=checkpoint, **other)
    damaged = tmp_path / "damaged" / "last.ckpt"
    damaged.parent.mkdir()
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped
    damaged.write_bytes(bytes(data))
    (damaged.parent / "last.ckpt.sha256").write_text((tmp_path / "short" / "last.ckpt.sha256").read_text())
    with pytest.raises(ValueError, match=r"damaged/last.ckpt: damaged \(its SHA-256 differs"):
        run_stream(tmp_path / "other", [], ckpt_path=damaged, num_edits=3)
    # the same stream, longer: it goes on from edit 3 and ends where an uninterrupted stream does
    curves = [ForgettingCurve(every_n_edits=1), ForgettingCurve(every_n_edits=1)]
    extended = run_stream(tmp_path / "short", curves[:1], ckpt_path=checkpoint, num_edits=5)
    whole = run_stream(tmp_path / "whole", curves[1:], num_edits=5)
    assert curves[0].history == curves[1].history and [p["edits"] for p in curves[0].history] == [1, 2, 3, 4, 5]
    assert extended.edits_done == 5 and len(extended.reference) == 5
    for a, b in zip(extended.reference, whole.reference, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(extended.strategy.memory.tau, whole.strategy.memory.tau)
    assert extended.strategy.adapter.thresholds == whole.strategy.adapter.thresholds


def test_a_curve_with_max_requests_scores_the_same_evenly_spaced_edits_at_every_point_and_also_at_others(tmp_path):
    curve = ForgettingCurve(every_n_edits=2, max_requests=2, also_at=(3,))
    module = run_stream(tmp_path, [curve], num_edits=5)
    assert [(p["edits"], p["scored"]) for p in curve.history] == [(2, 1), (3, 1), (4, 2), (5, 2)]  # every 3rd: 0, 3
    assert curve.forgetting.seen.tolist() == [True, False, False, True, False]
    requests, reference = [module.stream[i] for i in (0, 3)], [module.reference[i] for i in (0, 3)]
    final = request_scores(module, requests, reference, batch_size=4)
    assert curve.history[-1]["reliability"] == pytest.approx(float(final["reliability"].mean()))
    with pytest.raises(ValueError, match=r"trainer.callbacks.ForgettingCurve.max_requests must be 0 \(all\)"):
        ForgettingCurve(max_requests=-1)


def test_a_curve_scores_a_request_s_generalization_as_the_mean_over_its_rephrasings(tmp_path):
    module = run_stream(tmp_path, [], num_edits=2)
    first, second = module.stream[0], module.stream[1]
    both = dataclasses.replace(first, rephrases=(*first.rephrases, second.prompt))
    alone = dataclasses.replace(first, rephrases=(second.prompt,))
    none = dataclasses.replace(second, rephrases=())
    scores = request_scores(module, [first, alone, both, none], [module.reference[0]] * 3 + [module.reference[1]], 4)
    generalization = scores["generalization"]
    assert generalization[2] == pytest.approx(float(generalization[:2].mean()))
    assert torch.isnan(generalization[3]) and scores["reliability"][:3].unique().numel() == 1
    assert "ood_generalization" not in scores


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default(tmp_path):
    run_stream(tmp_path, [], num_edits=2)
    checkpoint = tmp_path / "last.ckpt"
    content = torch.load(checkpoint, weights_only=False)
    del content["wise_cl"]["identity"]["settings"]["route_sketch"]  # as written before the option existed
    torch.save(content, checkpoint)
    (tmp_path / "last.ckpt.sha256").write_text(file_sha256(checkpoint))
    with pytest.raises(ValueError, match=r"other strategy settings \(saved, here\): \{'route_sketch': \(0, 8\)\}"):
        run_stream(tmp_path, [], ckpt_path=checkpoint, num_edits=3, route_sketch=8)
    assert run_stream(tmp_path, [], ckpt_path=checkpoint, num_edits=3).edits_done == 3


@pytest.fixture
def edit_prompts(monkeypatch):
    """The prompts of every editing batch WISE builds, in order."""
    import wise_cl.strategies.wise as wise_module

    seen = []
    original = wise_module.teacher_forced_batch
    monkeypatch.setattr(
        wise_module, "teacher_forced_batch", lambda tok, p, a: seen.append(list(p)) or original(tok, p, a)
    )
    return seen


def test_one_by_one_editing_runs_one_loop_per_request(tiny, zsre10, edit_prompts):
    model, tokenizer = tiny
    requests = zsre10[:2]
    before = predict_answers(model, tokenizer, [requests[1].prompt], [requests[1].target]).nll.mean()
    strategy = small_wise(batch_edit=False, edits_per_shard=10)
    strategy.prepare(model, tokenizer)
    strategy.edit(EditBatch([0, 1], requests))
    after = predict_answers(model, tokenizer, [requests[1].prompt], [requests[1].target]).nll.mean()
    assert [rows[0] for rows in edit_prompts] == [r.prompt for r in requests]
    assert all(len(rows) == 1 + strategy.num_context + 1 for rows in edit_prompts)
    assert strategy.memory.edits == [(i, r.prompt, r.target) for i, r in enumerate(requests)] and after < before - 0.5


def test_retrieve_replay_adds_frozen_edits_as_irrelevant_rows(tiny, zsre10, edit_prompts):
    strategy = small_wise(retrieve=True, replay=1, edits_per_shard=1, shards_per_merge=1, n_iter=2)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    assert strategy.memory.replay_prompts == [zsre10[0].prompt, zsre10[1].prompt]
    assert edit_prompts[1][-1] == zsre10[0].prompt and zsre10[0].prompt not in edit_prompts[0][1:]
    assert len(strategy.adapter.taus) == 2


@pytest.mark.parametrize(("rival_margin", "replay", "shared"), [(0.0, 2, 0), (5.0, 0, 0), (5.0, 2, 0), (5.0, 2, 4)])
def test_rival_margin_gives_each_edit_the_route_of_the_memory_holding_it(tiny, zsre10, rival_margin, replay, shared):
    requests = zsre10[:3]
    strategy = small_wise(
        retrieve=True,
        edits_per_shard=1,
        shards_per_merge=1,
        rival_margin=rival_margin,
        replay=replay,
        shared_directions=shared,
    )
    strategy.prepare(*tiny)
    edit_requests(strategy, requests, lifecycle=True)
    taus = [memory.tau for memory in strategy.memory.frozen]
    scores = strategy.row_scores(taus, [r.prompt for r in requests], [r.target for r in requests])  # [memory, edit]
    holders = scores.argmax(0).tolist()
    if rival_margin and replay:  # each memory outscores the older ones on its edit and stays under its replayed ones
        assert holders == [0, 1, 2]
        rival = strategy.rival_scores([requests[0].prompt], [requests[0].target])
        assert rival.item() == pytest.approx(scores[:, 0].max().item(), rel=1e-5)
    elif rival_margin:  # above the older memories, but nothing keeps a newer memory under an older edit
        assert holders[1:] == [1, 2] and holders[0] != 0
    else:  # replay alone: the first memory responds to the later edits more than their own memories do
        assert holders[0] == 0 and holders[1:] != [1, 2]


def test_rival_scores_are_computed_once_per_row_until_a_spawn(tiny, zsre10, monkeypatch):
    strategy = small_wise(retrieve=True, edits_per_shard=1, shards_per_merge=1, rival_margin=5.0, replay=2)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    computed: list[list[str]] = []
    row_scores = strategy.row_scores
    monkeypatch.setattr(
        strategy, "row_scores", lambda taus, p, t, **kw: computed.append(p) or row_scores(taus, p, t, **kw)
    )
    prompts, targets = [r.prompt for r in zsre10[2:5]], [r.target for r in zsre10[2:5]]
    first = strategy.rival_scores(prompts[:2], targets[:2])
    again = strategy.rival_scores(prompts, targets)
    assert computed == [prompts[:2], prompts[2:]]  # only the row not seen since the spawn is scored again
    fresh = row_scores([memory.tau for memory in strategy.memory.frozen], prompts, targets).amax(0)
    assert torch.allclose(again, fresh, rtol=1e-5) and torch.equal(again[:2], first)
    restored = small_wise(retrieve=True, edits_per_shard=1, shards_per_merge=1, rival_margin=5.0, replay=2)
    restored.prepare(*tiny)
    restored.load_state_dict(strategy.state_dict())
    assert restored.rival_memo == strategy.rival_memo  # a resumed run trains against the same constants
    edit_requests(strategy, zsre10[2:3], start=2, lifecycle=True)  # its spawn freezes a third memory
    assert strategy.rival_memo == {} and len(strategy.memory.frozen) == 3


def test_consolidation_trains_the_full_shard_on_all_its_edits_and_resets_the_threshold(tiny, zsre10, edit_prompts):
    model, tokenizer = tiny
    requests = zsre10[:2]
    strategy = small_wise(consolidate_steps=5, n_iter=3)
    strategy.prepare(model, tokenizer)
    first = strategy.edit(EditBatch([0], [requests[0]]))
    nll_before = predict_answers(model, tokenizer, [r.prompt for r in requests], [r.target for r in requests]).nll
    second = strategy.edit(EditBatch([1], [requests[1]]))
    assert first["consolidation_steps"] == 0 and second["consolidation_steps"] == 5  # logged at every edit
    # the last batch holds both edits' plain prompts, then their irrelevant samples
    assert edit_prompts[-1][:2] == [r.prompt for r in requests] and len(edit_prompts[-1]) == 4
    rows = teacher_forced_batch(tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    scores = CachedForward(model, strategy.adapter, rows, TINY_LAYER).scores(strategy.memory.tau)
    assert strategy.memory.min_score == pytest.approx(scores.min().item(), rel=1e-5)
    nll_after = predict_answers(model, tokenizer, [r.prompt for r in requests], [r.target for r in requests]).nll
    assert nll_after.mean() < nll_before.mean()
    assert torch.all(strategy.memory.tau.detach()[strategy.memory.mask == 0] == 0)
    strategy.close_shard()
    assert strategy.memory.shard_edits == [] and strategy.memory.closed_min_score == strategy.memory.min_score


def test_retrain_contexts_consolidates_each_edit_with_its_context_rows_and_thresholds_on_plain_ones(
    tiny, zsre10, edit_prompts
):
    model, tokenizer = tiny
    requests = zsre10[:2]
    strategy = small_wise(consolidate_steps=4, n_iter=2, num_context=2, retrain_contexts=1)
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, requests)  # the second edit fills the shard and consolidates it
    context = strategy.contexts[0]
    expected = [text for r in requests for text in (r.prompt, f"{context} {r.prompt}")]
    assert edit_prompts[-1][:4] == expected  # each edit's plain row and its first context's, then irrelevant rows
    assert len(edit_prompts[-1]) == 4 + 2 * strategy.num_irrelevant
    scores = strategy.edit_scores(strategy.memory.tau.detach(), strategy.memory.shard_edits)
    assert strategy.memory.shard_min_score == pytest.approx(scores.min().item(), rel=1e-4)


def test_consolidation_leaves_the_activation_memo_with_the_last_edits_rows(tiny, zsre10):
    strategy = small_wise(consolidate_steps=2, n_iter=2, num_irrelevant=2)
    strategy.prepare(*tiny)
    edit_requests(strategy, zsre10[:2])  # the second edit fills the shard and consolidates it
    kept = {strategy.tokenizer.decode(key, skip_special_tokens=True) for key in strategy.activation_memo}
    assert kept == set(strategy.irrelevant[2:4])  # the second edit's irrelevant texts, not the first's


def test_rehearse_shard_retrains_the_open_shards_earlier_edits_with_each_edit(tiny, zsre10, edit_prompts):
    requests = zsre10[:3]
    strategy = small_wise(rehearse_shard=True, edits_per_shard=3, n_iter=3)
    strategy.prepare(*tiny)
    edit_requests(strategy, requests)
    # the third edit's rows: its own (plain and with contexts), then the two earlier plain prompts
    rows = 1 + strategy.num_context
    assert edit_prompts[-1][rows : rows + 2] == [r.prompt for r in requests[:2]]
    scores = strategy.edit_scores(strategy.memory.tau.detach(), strategy.memory.shard_edits)
    assert strategy.memory.shard_min_score == pytest.approx(scores.min().item(), rel=1e-4)


def test_rescore_on_merge_takes_the_threshold_from_the_merged_memory(tiny, zsre10):
    model, tokenizer = tiny
    requests = zsre10[:4]
    strategy = small_wise(rescore_on_merge=True, edits_per_shard=2, shards_per_merge=2, n_iter=4)
    strategy.prepare(model, tokenizer)
    edit_requests(strategy, requests, lifecycle=True)
    assert strategy.memory.merged is not None and strategy.memory.shards == []
    rows = teacher_forced_batch(tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    scores = CachedForward(model, strategy.adapter, rows, TINY_LAYER).scores(strategy.memory.merged)
    assert strategy.memory.min_score == pytest.approx(scores.min().item(), rel=1e-5)
    assert strategy.adapter.thresholds == [pytest.approx(strategy.act_ratio * scores.min().item(), rel=1e-5)]
    # the next shard's consolidation keeps the merged memory's edits in the running minimum
    assert strategy.memory.closed_min_score == strategy.memory.min_score


def test_each_edit_brings_num_irrelevant_samples_of_its_own(tiny, zsre10, edit_prompts):
    strategy = small_wise(num_irrelevant=3, n_iter=1)
    strategy.prepare(*tiny)
    strategy.edit(EditBatch([2], [zsre10[2]]))
    assert edit_prompts[-1][1 + strategy.num_context :] == strategy.irrelevant[6:9]


def test_merge_consolidation_trains_the_merged_memory_only_where_the_merge_set_entries(tiny, zsre10):
    model, tokenizer = tiny
    requests = zsre10[:4]
    strategy = small_wise(merge_consolidate_steps=3, edits_per_shard=2, shards_per_merge=2, n_iter=4)
    strategy.prepare(model, tokenizer)
    for i, request in enumerate(requests):
        strategy.edit(EditBatch([i], [request]))
        if strategy.shard_full():
            strategy.close_shard()
    plain = merge_task_vectors(strategy.memory.shards, strategy.merge_method, strategy.merge_density)
    strategy.merge()
    assert not torch.equal(strategy.memory.merged, plain)
    assert torch.all(strategy.memory.merged[plain == 0] == 0)
    assert torch.all(strategy.memory.tau.detach() == 0)  # the next shard starts empty
    scores = strategy.edit_scores(strategy.memory.merged, strategy.memory.edits)
    assert strategy.memory.min_score == pytest.approx(scores.min().item(), rel=1e-5)


def test_merge_retraining_is_capped_at_the_merged_group_and_a_sample_of_older_edits(tiny, zsre10):
    model, tokenizer = tiny
    strategy = small_wise(merge_consolidate_steps=1, merge_retrain_edits=3, edits_per_shard=1, shards_per_merge=2)
    strategy.prepare(model, tokenizer)
    retrained, consolidate = [], strategy.consolidate

    def recording(edits, *args):
        retrained.append([edit.index for edit in edits])
        return consolidate(edits, *args)

    strategy.consolidate = recording
    for i, request in enumerate(zsre10[:6]):
        strategy.edit(EditBatch([i], [request]))
        strategy.close_shard()
        if strategy.group_full():
            strategy.merge()
    assert retrained[0] == [0, 1]  # under the cap: every edit
    assert len(retrained[1]) == 3 and retrained[1][-2:] == [2, 3] and retrained[1][0] in (0, 1)
    assert len(retrained[2]) == 3 and retrained[2][-2:] == [4, 5] and retrained[2][0] in range(4)
    scores = strategy.edit_scores(strategy.memory.merged, [strategy.memory.edits[i] for i in retrained[2]])
    assert strategy.memory.min_score == pytest.approx(scores.min().item(), rel=1e-5)


def test_merge_retrain_pool_retrains_the_older_edits_the_merged_memory_answers_worst(tiny, zsre10):
    model, tokenizer = tiny
    strategy = small_wise(
        merge_consolidate_steps=1, merge_retrain_edits=3, merge_retrain_pool=10, edits_per_shard=1, shards_per_merge=1
    )
    strategy.prepare(model, tokenizer)
    for i, request in enumerate(zsre10[:5]):
        strategy.edit(EditBatch([i], [request]))
        strategy.close_shard()
        strategy.merge()
    memory = strategy.memory
    losses = strategy.edit_losses(memory.merged, memory.edits[:-1])  # every older edit is in the pool
    assert losses.shape == (4,) and torch.isfinite(losses).all() and len(set(losses.tolist())) == 4
    worst = sorted(losses.topk(2).indices.tolist())
    expected = [memory.edits[i].index for i in worst] + [memory.edits[-1].index]  # and the merged shard's own
    assert [edit.index for edit in strategy.retraining_edits()] == expected


def test_calibration_texts_are_held_back_and_floor_every_memory_threshold(tiny, zsre10, edit_prompts):
    model, tokenizer = tiny
    strategy = small_wise(
        retrieve=True, edits_per_shard=1, shards_per_merge=1, n_iter=3, calibration_texts=6, calibration_quantile=1.0
    )
    strategy.prepare(model, tokenizer)
    held_back = strategy.calibration
    assert len(held_back) == 6 and not set(held_back) & set(strategy.irrelevant)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    # the held-back texts form one batch of their own, scored once, and join no training batch
    assert [rows for rows in edit_prompts if set(rows) & set(held_back)] == [held_back]
    rows = teacher_forced_batch(tokenizer, held_back, [""] * len(held_back))
    assert len(strategy.adapter.taus) == 2
    for tau, threshold in zip(strategy.adapter.taus, strategy.adapter.thresholds, strict=True):
        # quantile 1: no held-back text passes any memory's threshold
        assert threshold >= CachedForward(model, strategy.adapter, rows, TINY_LAYER).scores(tau).max().item() - 1e-4
    assert max(strategy.adapter.thresholds) > min(strategy.act_ratio * m.min_score for m in strategy.memory.frozen)
    with pytest.raises(ValueError, match="calibration_texts"):
        WISE(layer=TINY_LAYER, calibration_texts=10_000).prepare(model, tokenizer)


def test_shared_directions_make_every_serving_memory_blind_to_them(tiny, zsre10):
    model, tokenizer = tiny
    strategy = small_wise(shared_directions=4, retrieve=True, edits_per_shard=1, shards_per_merge=1, n_iter=3)
    strategy.prepare(model, tokenizer)
    basis = strategy.basis
    assert basis.shape == (strategy.adapter.weight.shape[1], 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    edit_requests(strategy, zsre10[:2], lifecycle=True)
    assert len(strategy.adapter.taus) == 2
    for tau in strategy.adapter.taus:
        assert tau.abs().max() > 0 and (tau @ basis).abs().max() < 1e-4 * tau.abs().max()
    # the training forward sees the projected memory: its scores equal the served memory's
    rows = teacher_forced_batch(tokenizer, [zsre10[0].prompt], [zsre10[0].target])
    raw = strategy.memory.frozen[0].tau + 5 * torch.randn_like(strategy.memory.frozen[0].tau) @ basis @ basis.T
    served = CachedForward(model, strategy.adapter, rows, TINY_LAYER).scores(strategy.adapter.taus[0])
    torch.testing.assert_close(strategy._forward(rows).scores(raw), served, rtol=1e-4, atol=1e-4)


def last_token_inputs(strategy: WISE, model, tokenizer, texts: list[str]) -> torch.Tensor:
    """The edited layer's input at each text's last token, each text read alone (an independent hook)."""
    captured = []
    hook = strategy.adapter.register_forward_pre_hook(lambda _, args: captured.append(args[0][0, -1]))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    hook.remove()
    return torch.stack(captured)


def test_nearest_negatives_are_the_subjects_read_most_like_the_edit_subject(tiny, zsre10, tmp_path, monkeypatch):
    monkeypatch.setattr(key_statistics, "cache_dir", lambda: tmp_path / "cache")
    model, tokenizer = tiny
    request, subjects = zsre10[0], ["Ada Lovelace", "Kyoto", "Renault Twingo", "Mount Fuji", "Johann Sebastian Bach"]
    listed = tmp_path / "subjects.json"
    listed.write_text(json.dumps([*subjects, request.subject]))  # its own subject is never its negative
    strategy = small_wise(subject_negatives=2, negative_subjects=str(listed), negative_choice="nearest", n_iter=1)
    strategy.prepare(model, tokenizer)
    inputs = last_token_inputs(strategy, model, tokenizer, [request.subject, *subjects])
    similarity = F.cosine_similarity(inputs[1:], inputs[0][None])
    nearest = [subjects[i] for i in similarity.topk(2).indices.tolist()]
    edit_requests(strategy, [request])
    assert strategy.negatives[0] == [request.prompt.replace(request.subject, subject) for subject in nearest]


def test_prompt_negatives_are_the_listed_prompts_read_most_like_the_edit_prompt(tiny, zsre10, tmp_path, monkeypatch):
    monkeypatch.setattr(key_statistics, "cache_dir", lambda: tmp_path / "cache")
    model, tokenizer = tiny
    request = zsre10[0]
    prompts = [
        "Kyoto is located in",
        "The mother tongue of Ada Lovelace is",
        "Renault Twingo is made by",
        "Who is Bach?",
    ]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([*prompts, f"Where is {request.subject}?"]))  # mentions its subject: never picked
    strategy = small_wise(prompt_negatives=2, negative_prompts=str(listed), subject_negatives=1, n_iter=1)
    strategy.prepare(model, tokenizer)
    inputs = last_token_inputs(strategy, model, tokenizer, [request.prompt, *prompts])
    similarity = F.cosine_similarity(inputs[1:], inputs[0][None])
    nearest = [prompts[i] for i in similarity.topk(2).indices.tolist()]
    edit_requests(strategy, [request])
    swapped, *listed_negatives = strategy.negatives[0]  # the subject-swapped copy first
    assert request.subject not in swapped and listed_negatives == nearest
    with pytest.raises(ValueError, match="strategy.prompt_negatives must be at least 0"):
        small_wise(prompt_negatives=-1)


def test_listed_prompts_inputs_are_read_from_the_cache_on_the_next_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(key_statistics, "cache_dir", lambda: tmp_path / "cache")
    model, tokenizer = tiny
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(["Kyoto is located in", "Who is Bach?", "Renault Twingo is made by"]))
    first = small_wise(prompt_negatives=1, negative_prompts=str(listed))
    first.prepare(model, tokenizer)
    assert len(list((tmp_path / "cache" / "last_token_inputs").glob("*.safetensors"))) == 1
    monkeypatch.setattr(WISE, "last_inputs", lambda *_: pytest.fail("the listed prompts were read again"))
    second = small_wise(prompt_negatives=1, negative_prompts=str(listed))
    second.prepare(model, tokenizer)
    torch.testing.assert_close(second.pool_vectors, first.pool_vectors, rtol=0, atol=0)


def test_subject_negatives_swap_in_listed_subjects_and_are_trained_against(tiny, zsre10, edit_prompts, tmp_path):
    listed = tmp_path / "subjects.json"
    subjects = ["Ada Lovelace", "Kyoto", "Renault Twingo"]
    listed.write_text(json.dumps(subjects))
    settings = dict(subject_negatives=2, negative_subjects=str(listed), retrieve=True, edits_per_shard=3)
    strategy = small_wise(**settings, shards_per_merge=1, n_iter=2)
    strategy.prepare(*tiny)
    requests = zsre10[:3]
    assert all(r.subject and r.subject in r.prompt for r in requests)
    edit_requests(strategy, requests)
    for index, request in enumerate(requests):
        swapped = {request.prompt.replace(request.subject, subject) for subject in subjects}
        negatives = strategy.negatives[index]
        assert len(set(negatives)) == 2 and set(negatives) <= swapped
        assert set(negatives) <= set(edit_prompts[index][1 + strategy.num_context :])
    # they travel with the checkpoint and leave with the memory when it is frozen
    restored = small_wise(**settings, shards_per_merge=1)
    restored.prepare(*tiny)
    restored.load_state_dict(strategy.state_dict())
    assert restored.negatives == strategy.negatives
    for callback in strategy.callbacks():
        callback.after_edit(strategy)
    assert strategy.memory.frozen and strategy.negatives == {}
