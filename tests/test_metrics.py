import math

import pytest
import torch

from wise_cl.evaluation import (
    EditMetrics,
    first_lines,
    generate_answers,
    generation_reference,
    locality_reference,
    predict_answers,
)
from wise_cl.metrics import AnswerMatch, ExactMatch, Forgetting, TargetPerplexity, TokenAccuracy, normalize_answer


def scores(model, tokenizer, requests, batch_size, padding_side):
    metrics = EditMetrics(exact_match=True, padding_side=padding_side)
    reference = locality_reference(model, tokenizer, requests)
    generated = generation_reference(model, tokenizer, requests)
    for start in range(0, len(requests), batch_size):
        chunk = slice(start, start + batch_size)
        metrics.update(model, tokenizer, requests[chunk], reference[chunk], generated[chunk])
    return metrics.compute()


def test_scores_do_not_depend_on_batch_size_or_padding_side(tiny, zsre10):
    model, tokenizer = tiny
    requests = zsre10[:8]
    one = scores(model, tokenizer, requests, 1, "right")
    eight = scores(model, tokenizer, requests, 8, "right")
    left = scores(model, tokenizer, requests, 8, "left")
    free = {"exact_match", "answer_match", "rephrase_answer_match", "generation_locality"}
    assert set(one) == {"reliability", "generalization", "locality", "perplexity", *free}
    for name in one:
        assert one[name] == pytest.approx(eight[name], rel=1e-5)
        assert one[name] == pytest.approx(left[name], rel=1e-5)
    # the unedited model against its own predictions and continuations
    assert one["locality"] == 1.0 and one["generation_locality"] == 1.0


def test_token_accuracy_averages_per_request_first():
    metric = TokenAccuracy()
    # request 0: 1 of 1 right, request 1: 1 of 3 right -> (1 + 1/3) / 2
    metric.update(torch.tensor([5, 1, 2, 3]), torch.tensor([5, 1, 9, 9]), torch.tensor([0, 1, 1, 1]))
    assert metric.compute().item() == pytest.approx(2 / 3)
    # a request without scored positions (an empty locality answer) has no score rather than 0
    metric.reset()
    metric.update(torch.tensor([5, 1, 2]), torch.tensor([5, 1, 9]), torch.tensor([0, 2, 2]))
    assert metric.compute().item() == pytest.approx((1 + 1 / 2) / 2)


def test_perplexity_is_the_geometric_mean_over_requests():
    metric = TargetPerplexity()
    # request 0: token NLLs 1 and 3 (mean 2), request 1: one token of NLL 20 (an unrouted edit)
    metric.update(torch.tensor([1.0, 3.0, 20.0]), torch.tensor([0, 0, 1]))
    assert metric.compute().item() == pytest.approx(math.exp((2 + 20) / 2))
    # the arithmetic mean of the per-request perplexities would be about 2.4e8
    assert metric.compute().item() < 1e5


def test_predictions_are_teacher_forced_at_answer_positions(tiny):
    model, tokenizer = tiny
    out = predict_answers(model, tokenizer, ["ab", "abcdef"], ["xyz", "q"])
    assert (
        out.labels.tolist()
        == tokenizer(" xyz", add_special_tokens=False)["input_ids"]
        + tokenizer(" q", add_special_tokens=False)["input_ids"]
    )
    assert out.rows.tolist() == [0, 0, 0, 0, 1, 1]
    full = tokenizer("ab xyz", return_tensors="pt")["input_ids"]
    logits = model(full).logits[0]
    assert out.preds[:4].tolist() == logits[-5:-1].argmax(-1).tolist()


def test_exact_match_uses_greedy_generation(tiny, zsre10):
    model, tokenizer = tiny
    prompts = [r.prompt for r in zsre10[:4]]
    targets = [r.target for r in zsre10[:4]]
    generated = generate_answers(model, tokenizer, prompts, targets)
    # batched (left padded) decoding equals one-by-one decoding
    assert generated == [generate_answers(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets, strict=True)]
    # and equals a hand-rolled greedy loop of as many tokens as the target has
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    for _ in range(len(tokenizer(" " + targets[0], add_special_tokens=False)["input_ids"])):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    prompt_length = len(tokenizer(prompts[0])["input_ids"])
    assert generated[0] == tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    metric = ExactMatch()
    metric.update(generated[:2] + ["definitely not this"] * 2, [g.upper() + "!" for g in generated[:2]] + targets[2:])
    assert metric.compute().item() == 0.5


def test_answer_match_counts_answers_that_start_with_the_target(tiny):
    model, tokenizer = tiny
    answers = first_lines(model, tokenizer, ["ab", "abcdef"], max_new_tokens=8)
    assert all("\n" not in a for a in answers)
    metric = AnswerMatch()
    metric.update(["Paris, the capital.", "the Beatles", "Lyon"], ["paris", "The Beatles!", "Paris"])
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_normalize_answer():
    assert normalize_answer("  The  Beatles! ") == "the beatles"


def test_forgetting_is_best_minus_current():
    metric = Forgetting(3)
    metric.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.5]))
    assert metric.compute().item() == 0.0
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0.25, 1.0, 0.0]))
    assert metric.compute().item() == pytest.approx((0.75 + 0.0 + 0.0) / 3)
