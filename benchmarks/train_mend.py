"""Train MEND's editor on edits that no reported stream uses, and save it for `MEND(editor=...)`.

python -m wise_cl.benchmarks.train_mend --minutes 60 --out wise_cl/resources/mend/smollm2-135m.safetensors

Training requests: the ZsRE training-split sample from request 200 on (the robustness streams use 0-199) and
CounterFact records 5000-9999 (reported streams use at most the first 3000), alternating, in a seeded order;
the last `--held-out` of them are kept aside to validate. Each step edits the unedited model with one request
(its gradient through the editor), then scores the changed model: the target's NLL on the prompt and its
rephrasings (weight `--edit-weight`) plus KL(unedited || changed) at the answer positions of its locality
prompt, as in the paper. Writes the editor and `<out>.json` (settings, commit, loss and validation curves).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wise_cl.evaluation import predict_answers
from wise_cl.models import load_model
from wise_cl.optimisation import edit_nll
from wise_cl.provenance import code_version
from wise_cl.records import EditRequest, read_requests
from wise_cl.rows import teacher_forced_batch
from wise_cl.strategies.mend import MEND

SOURCES = (("zsre_train", 200, None), ("counterfact", 5000, 5000))


def training_requests(seed: int) -> list[EditRequest]:
    """The training pool: both sources interleaved, each in a seeded order."""
    pools = []
    for name, start, limit in SOURCES:
        pool = read_requests(name, None, limit, start)
        random.Random(seed).shuffle(pool)
        pools.append(pool)
    mixed = [r for pair in zip(*pools, strict=False) for r in pair]
    return mixed + [r for pool in pools for r in pool[len(mixed) // len(pools) :]]


def step_loss(strategy: MEND, request: EditRequest, edit_weight: float, observe: bool) -> dict[str, torch.Tensor]:
    """One request's training loss through the editor (see the module docstring)."""
    rows = teacher_forced_batch(strategy.tokenizer, [request.prompt], [request.target])
    factors = strategy.gradient_factors(rows)
    if observe:
        for inputs, grads in factors.values():
            strategy.editor.observe(torch.cat([inputs, grads], -1))
    changes = strategy.changes(factors)
    prompts = [request.prompt, *request.rephrases]
    equivalent = teacher_forced_batch(strategy.tokenizer, prompts, [request.target] * len(prompts))
    unrelated = teacher_forced_batch(strategy.tokenizer, [request.locality_prompt], [request.locality_answer])
    with torch.no_grad():
        reference = strategy.logits(unrelated).float().log_softmax(-1)
    with strategy.changed(changes):
        edit_loss = edit_nll(strategy.logits(equivalent), equivalent, len(prompts)).mean()
        changed = strategy.logits(unrelated).float().log_softmax(-1)
    kl = F.kl_div(changed, reference, log_target=True, reduction="none").sum(-1).mean()
    return {"loss": edit_weight * edit_loss + kl, "edit_loss": edit_loss, "kl": kl}


def validate(strategy: MEND, requests: list[EditRequest]) -> dict[str, float]:
    """Single edits from the unedited model: token accuracy on the prompt, the rephrasings and the locality
    prompt's unedited predictions, averaged over `requests`."""
    scores: dict[str, list[float]] = {"reliability": [], "generalization": [], "locality": []}
    for request in requests:
        loc = ([request.locality_prompt], [request.locality_answer])
        before = predict_answers(strategy.model, strategy.tokenizer, *loc).preds
        rows = teacher_forced_batch(strategy.tokenizer, [request.prompt], [request.target])
        factors = strategy.gradient_factors(rows)
        with torch.no_grad(), strategy.changed(strategy.changes(factors)):
            for name, prompts in (("reliability", [request.prompt]), ("generalization", list(request.rephrases))):
                if prompts:
                    out = predict_answers(strategy.model, strategy.tokenizer, prompts, [request.target] * len(prompts))
                    scores[name].append(float((out.preds == out.labels).double().mean()))
            after = predict_answers(strategy.model, strategy.tokenizer, *loc).preds
            scores["locality"].append(float((after == before).double().mean()))
    return {name: sum(values) / len(values) for name, values in scores.items() if values}


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    strategy = MEND(layer=args.layer, num_layers=args.num_layers, editor=None, rank=args.rank)
    strategy.prepare(model, tokenizer)
    editor = strategy.editor.requires_grad_(True)
    pool = training_requests(args.seed)
    held_out, pool = pool[-args.held_out :], pool[: -args.held_out]
    others = [p for name, p in editor.named_parameters() if name != "lrs"]
    optimizer = torch.optim.Adam([{"params": others, "lr": args.lr}, {"params": [editor.lrs], "lr": args.lr_lr}])
    history: list[dict[str, float]] = []
    validations = [{"step": 0, **validate(strategy, held_out)}]
    start, step = time.perf_counter(), 0
    progress = tqdm(total=args.steps, desc="train_mend")
    while step < args.steps and time.perf_counter() - start < args.minutes * 60:
        losses = step_loss(strategy, pool[step % len(pool)], args.edit_weight, observe=step < args.observe_steps)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), 100.0)
        optimizer.step()
        step += 1
        history.append({"step": step, **{k: round(v.item(), 5) for k, v in losses.items()}})
        progress.update()
        progress.set_postfix(loss=f"{float(losses['loss']):.3f}", edit=f"{float(losses['edit_loss']):.3f}")
        if step % args.validate_every == 0:
            validations.append({"step": step, **validate(strategy, held_out)})
            print(json.dumps(validations[-1]), flush=True)
    progress.close()
    if validations[-1]["step"] != step:
        validations.append({"step": step, **validate(strategy, held_out)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strategy.save_editor(args.out)
    return {
        "command": "python -m wise_cl.benchmarks.train_mend " + shlex.join(sys.argv[1:]),
        "commit": code_version(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sources": [list(s) for s in SOURCES],
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "step_size_per_layer": editor.lrs.tolist(),
        "validation": validations,
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", default="model.layers.29.mlp.down_proj")
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    parser.add_argument("--minutes", type=float, default=60.0, help="at most this much training time")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam step size of the network")
    parser.add_argument("--lr-lr", type=float, default=1e-4, help="Adam step size of the per-layer step sizes")
    parser.add_argument("--edit-weight", type=float, default=0.1, help="weight of the edit NLL against the KL")
    parser.add_argument("--observe-steps", type=int, default=500, help="steps that update the factor statistics")
    parser.add_argument("--held-out", type=int, default=50)
    parser.add_argument("--validate-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("wise_cl/resources/mend/smollm2-135m.safetensors"))
    args = parser.parse_args()
    report = train(args)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
