"""How much the edited layer's input activations of different prompts overlap, with and without the
directions every text shares: the reason a WISE memory answers for prompts it never learned.

python -m wise_cl.benchmarks.activation_overlap --data zsre --start 100 --num-edits 100 \
    --directions 0 8 32 128 --out benchmarks/results/activation_overlap

For each edit request, the mean input activation of `down_proj` over the real tokens of prompt + target
is compared (cosine) with the same for its rephrase, for the most similar other edit of the stream, for
its prompt with the subject swapped for another request's, and for the most similar locality prompt.
`--directions k` first removes the k leading principal directions of the activations of the WISE
irrelevant texts (what `shared_directions: k` makes a side memory ignore). Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from wise_cl import WISE, load_model, read_requests
from wise_cl.provenance import code_version
from wise_cl.strategies.wise import SHARED_DIRECTION_TEXTS


def mean_activations(strategy: WISE, prompts: list[str], answers: list[str]) -> Tensor:
    """Per prompt + answer, the edited layer's input activation averaged over its real tokens: [n, in]."""
    texts = [f"{prompt} {answer}".strip() for prompt, answer in zip(prompts, answers, strict=True)]
    rows = []
    for start in range(0, len(texts), 16):
        rows += [tokens.mean(0) for tokens in strategy.token_activations(texts[start : start + 16])]
    return torch.stack(rows)


def overlap(strategy: WISE, requests: list, directions: list[int], seed: int = 0) -> list[dict[str, float]]:
    """Mean cosines of each edit with its rephrase, nearest other edit, subject-swapped prompt, nearest locality."""
    rng = random.Random(seed)
    subjects = [r.subject for r in requests]
    swapped = [r.prompt.replace(r.subject, rng.choice([s for s in subjects if s != r.subject])) for r in requests]
    targets = [r.target for r in requests]
    edit = mean_activations(strategy, [r.prompt for r in requests], targets)
    sets = {
        "rephrase": mean_activations(strategy, [r.rephrases[0] for r in requests], targets),
        "swapped_subject": mean_activations(strategy, swapped, targets),
        "locality": mean_activations(
            strategy, [r.locality_prompt for r in requests], [r.locality_answer for r in requests]
        ),
    }
    leading = strategy.principal_directions(strategy.irrelevant[:SHARED_DIRECTION_TEXTS], max(directions))
    rows = []
    for k in directions:
        basis = leading[:, :k] if k else None
        project = (lambda x: x) if basis is None else (lambda x, u=basis: x - (x @ u) @ u.T)
        e = F.normalize(project(edit), dim=-1)
        others = e @ e.T - 2 * torch.eye(len(e))  # an edit is not its own nearest other edit
        cos = {name: F.normalize(project(x), dim=-1) for name, x in sets.items()}
        rows.append(
            {
                "directions_removed": k,
                "own_rephrase": float((e * cos["rephrase"]).sum(-1).mean()),
                "nearest_other_edit": float(others.max(1).values.mean()),
                "swapped_subject": float((e * cos["swapped_subject"]).sum(-1).mean()),
                "nearest_locality": float((e @ cos["locality"].T).max(1).values.mean()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--start", type=int, default=100)
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--layer", default="model.layers.25.mlp.down_proj")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--directions", type=int, nargs="+", default=[0, 8, 32, 128])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/activation_overlap"))
    args = parser.parse_args()
    strategy = WISE(layer=args.layer)
    strategy.prepare(*load_model(args.model))
    requests = read_requests(args.data, limit=args.num_edits, start=args.start)
    rows = overlap(strategy, requests, args.directions)
    command = "python -m wise_cl.benchmarks.activation_overlap " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.json").write_text(
        json.dumps({"command": command, "commit": code_version(), "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "| directions removed | own rephrase | nearest other edit | swapped subject | nearest locality |",
        "|---|---|---|---|---|",
    ]
    keys = ("own_rephrase", "nearest_other_edit", "swapped_subject", "nearest_locality")
    lines += [f"| {r['directions_removed']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in rows]
    (args.out / "overlap.md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
