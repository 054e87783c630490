"""WISE (arXiv 2405.14768): edit a side copy of one FFN projection, route each sequence by activation score.

This file is the method: the rows an edit trains on, its losses (editing NLL plus the activation margins)
and the lifecycle steps the callbacks run. The side memory's book-keeping (shards, merge, WISE-Retrieve's
frozen memories, what serves) is `wise_cl.strategies.wise_memory.ShardedMemory`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.callbacks import KnowledgeMerging, KnowledgeSharding, MemorySpawning
from wise_cl.data import EditBatch
from wise_cl.editing_forward import CachedForward, FullForward, ProjectedForward, project_out
from wise_cl.key_statistics import cached_tensor, model_fingerprint
from wise_cl.merging import MERGE_METHODS
from wise_cl.optimisation import edit_nll, optimise
from wise_cl.prefixes import PREFIX_SEEDS, PREFIX_STYLES, generate_prefixes
from wise_cl.records import EditRequest, read_negative_prompts, read_subjects
from wise_cl.rows import TeacherForcedBatch, teacher_forced_batch
from wise_cl.side_memory import save_side_memories
from wise_cl.strategies.base import LinearEditStrategy, mean_stats
from wise_cl.strategies.wise_memory import Edit, ShardedMemory
from wise_cl.validation import require, require_choice

SHARED_DIRECTION_TEXTS = 500  # irrelevant texts whose activations give the shared input directions


class WISE(LinearEditStrategy):
    """Edit a side copy of one FFN projection; route each sequence to it by activation score.

    Args:
        layer: module path of the Linear holding the main memory.
        mask_ratio: rho, the share of entries each knowledge shard may change.
        edits_per_shard: consecutive edits that share one random subspace.
        shards_per_merge: k, shards merged into one side memory when all are complete.
        merge_method: `ties`, `linear`, `dare` or `dare_ties`.
        merge_density: share of each task vector kept by trimming (Ties) or dropping (DARE).
        prior_merge_weight: weight of the previous merged memory when new shards join it.
        alpha: margin the irrelevant sample's activation score is pushed below.
        beta: margin the edit rows' activation scores are pushed above.
        gamma: margin between edit and irrelevant activation scores.
        act_loss_weight: weight of the activation loss against the editing loss (1 in the paper; its
            gradient grows with the squared activation norm, so models with large activations need less).
        act_loss_form: `mean`: each hinge averaged over all its rows, every edit row against the mean
            irrelevant score; `official` (the paper's code): the gap hinge for every (irrelevant row, edit row)
            pair, and each hinge averaged over its violating entries only (0 when none violates).
        act_ratio: routing threshold as a share of the smallest edit score a memory holds.
        lr: SGD learning rate on the side memory.
        weight_bound: after every step each entry of the task vector is clamped to [-bound, bound], so W'
            stays within W +/- bound (0: off; the paper's code uses 1).
        n_iter: optimisation steps per experience at most.
        early_stop_loss: stop an experience's loop once the loss is below this.
        early_stop_on: `loss` (editing plus activation loss) or `edit_loss` (the editing loss alone: the
            activation margins may be out of reach, and then the total never falls under the bound).
        num_context: generated context prefixes per edit row (rows per edit = 1 + num_context).
        context_length: tokens per generated prefix.
        context_style: `sampled`: each prefix samples `context_length` tokens after a seed like "I" or "Because"
            (seeded); `official` (the paper's code): greedy continuations of "I", "You", "Because", "Yes" and
            "Q: ", of 5 tokens and then of 10 (`context_length` unused).
        score_context: count the context prefix tokens in an edit row's activation score (False: only
            the prompt and target tokens, which are what a routed sequence holds at inference).
        threshold_rows: the score an edit records for its memory's threshold: `plain`, the smallest score among
            its rows without a context prefix; `all` (the paper's code), the mean over all its rows. Consolidation
            and re-scoring record plain rows either way.
        score_activation: put the model's activation function around the side and main outputs before their
            distance, `||act(W'a) - act(Wa)||` (the paper's code; False: `||W'a - Wa||`, the paper's Eq. 3).
        keep_route: generation keeps the route decided on the prompt for every new token (False: every new token
            is routed again on itself alone, as the paper's code does).
        route_on: `sequence` (the paper): a sequence's activation score, for training, thresholds and routing,
            averages over its prompt and answer tokens; `prompt`: over its prompt tokens alone, which is what
            generation has when it decides the route, so a memory's threshold is set on what it is used on.
        route_sketch: route in two stages once more than `route_candidates` memories serve: every memory scored
            on a random projection of its output to this many dimensions, then each sequence's `route_candidates`
            best scored exactly (0: every memory scored exactly, as in the paper; see `SideMemoryLinear`).
        route_candidates: memories per sequence scored exactly after the sketch.
        irrelevant_source: bundled data set name or JSON list of the irrelevant texts.
        num_irrelevant: irrelevant texts per edit (edit i uses texts i*n to i*n+n-1, wrapping around the list);
            they need only their activation score, so more of them cost little per step.
        calibration_texts: the last this many irrelevant texts are held back from training; each memory's
            threshold is at least `calibration_quantile` of its scores on them, so a memory that scores every
            prompt high does not take unrelated ones (0: off, as in the paper).
        calibration_quantile: the share of the held-back texts a memory's threshold is kept above.
        shared_directions: the side memory ignores this many principal directions of the edited layer's input
            over the irrelevant texts (it reads `(I - U U^T) a`, U those directions): every text has a large
            component there, so a memory trained on them scores unrelated prompts and other memories' edits
            almost as high as its own (0: off, as in the paper).
        subject_negatives: each edit whose prompt contains its subject also trains against this many copies of
            the prompt with the subject replaced by other subjects (score-only rows, like the irrelevant texts),
            so a memory answers for the subject and not for every prompt of the same relation (0: off, as in
            the paper); they act only with a stronger `act_loss_weight`.
        negative_subjects: JSON list of the subjects swapped in (`bundled`: 1000 CounterFact subjects that no
            bundled edit request has); subjects of the stream's own edits would make a negative of another edit.
        negative_choice: which of them an edit swaps in: `random` (seeded per edit) or `nearest`, those whose
            representation (the edited layer's input at the subject's last token, read alone, blind to the shared
            directions) is closest in cosine to the edit subject's: subjects of the same kind, such as another
            city for a city, are the prompts of the same relation a memory must still refuse.
        prompt_negatives: each edit also trains against this many prompts about other subjects from
            `negative_prompts`, those whose representation (the edited layer's input at the prompt's last token,
            read alone, blind to the shared directions) is closest in cosine to the edit prompt's: the edit's
            relation in other words, which the subject-swapped copies (the edit's own words) do not cover (0: off).
        negative_prompts: JSON list of those prompts (`bundled`: 2000 CounterFact training-split prompts whose
            subjects no bundled file mentions).
        retrieve: WISE-Retrieve: each merged memory is frozen (after `merges_per_memory` merges) and a new one started.
        merges_per_memory: WISE-Retrieve: a memory takes this many merges (each of `shards_per_merge` shards,
            merged into it as WISE-Merge merges) before it is frozen, so it holds `edits_per_shard` x
            `shards_per_merge` x this many edits (1: frozen after its first merge).
        shard_routers: WISE-Merge: keep each shard as it closes to route beside the merged memory, which
            answers every sequence a shard passes (by the largest factor over its threshold) and is not routed
            on its own scores: one merged memory's scores cannot tell its edits from others asked the same
            relation, its shards' can (False: the merged memory routes itself, as in the paper).
        replay: prompts of this many of the latest edits held by other memories (WISE-Retrieve's frozen ones,
            WISE-Merge's shard routers) join each edit as irrelevant rows, so the memory under edit learns to
            stay quiet on them (0: off).
        rival_margin: WISE-Retrieve: the highest score wins the route, so each plain edit row is also trained to
            score this much above the highest score a frozen memory gives it, and each replayed prompt this much
            below it. A frozen memory never sees later edits, and one that responds to a new edit more than the new
            memory does would take its route, as would a new memory that responds to a replayed edit more than its
            own memory does (0: off, as in the paper).
        rehearse_shard: each edit also trains on the plain prompts of the open shard's earlier edits, so the
            shard's edits do not overwrite each other (False: as in the paper).
        consolidate_steps: when a shard is full, train it this many more steps on all its edits together
            (their plain prompts, and `retrain_contexts` context rows each) and record their scores again for the
            threshold; edits made one after another overwrite each other in a shard, and this recovers them
            (0: off, as in the paper).
        retrain_contexts: consolidation and retraining after a merge also train each edit with this many of its
            context-prefixed rows, as editing does, so that what the rows taught beyond the plain prompt (the
            rephrasings' generalization) is not trained away (0: plain prompts only; at most `num_context`).
        rescore_on_merge: after a merge, record the scores of all the memory's edits under the merged memory
            for its threshold (False: keep the smallest score recorded while editing, as in the paper; a merge
            adds the other shards' response, so those scores sit well below what the merged memory gives).
        merge_consolidate_steps: after a merge, train the merged memory this many steps on all the edits it
            holds (only entries the merge set move), then record their scores as with `rescore_on_merge`;
            each shard was trained without the others, whose response on its edits the merge adds (0: off).
        merge_retrain_edits: retrain after a merge on at most this many of the memory's edits: the merged
            group's own, then a seeded sample of the older ones, so a merge's cost stops growing with the
            stream; the threshold comes from the retrained edits' scores (0: every edit, as before).
        merge_retrain_pool: with `merge_retrain_edits`, score a seeded sample of this many older edits under
            the merged memory and retrain the ones it answers worst (highest target NLL) instead of a random
            sample (0: a random sample); scoring costs a forward pass of the pool per merge.
        merge_retrain_entries: which entries of the merged memory retraining moves: `all` it sets, or only the
            `new` ones the merged group's shards could change, so that older edits' entries do not drift toward
            the edits retrained on.
        batch_edit: edit an experience's requests together in one loop (False: one by one).
        cached_forward: run layers below the edited one once per experience (False: full model each step).
        seed: seed for masks and context prefixes.
    """

    name = "wise"
    written_once = ("frozen", "routers")  # WISE-Retrieve's frozen memories, WISE-Merge's shard routers
    serving_settings = ("act_ratio", "keep_route", "route_sketch", "route_candidates")

    def __init__(
        self,
        layer: str = "model.layers.25.mlp.down_proj",
        mask_ratio: float = 0.2,
        edits_per_shard: int = 50,
        shards_per_merge: int = 2,
        merge_method: str = "ties",
        merge_density: float = 0.5,
        prior_merge_weight: float = 2.0,
        alpha: float = 5.0,
        beta: float = 20.0,
        gamma: float = 10.0,
        act_loss_weight: float = 1.0,
        act_loss_form: str = "mean",
        act_ratio: float = 0.88,
        lr: float = 1.0,
        weight_bound: float = 0.0,
        n_iter: int = 70,
        early_stop_loss: float = 0.01,
        early_stop_on: str = "loss",
        num_context: int = 10,
        context_length: int = 10,
        context_style: str = "sampled",
        score_context: bool = False,
        threshold_rows: str = "plain",
        score_activation: bool = False,
        keep_route: bool = True,
        route_on: str = "sequence",
        route_sketch: int = 0,
        route_candidates: int = 4,
        irrelevant_source: str = "zsre",
        num_irrelevant: int = 1,
        calibration_texts: int = 0,
        calibration_quantile: float = 0.9,
        shared_directions: int = 0,
        subject_negatives: int = 0,
        negative_subjects: str = "bundled",
        negative_choice: str = "random",
        prompt_negatives: int = 0,
        negative_prompts: str = "bundled",
        retrieve: bool = False,
        merges_per_memory: int = 1,
        shard_routers: bool = False,
        replay: int = 0,
        rival_margin: float = 0.0,
        rehearse_shard: bool = False,
        consolidate_steps: int = 0,
        rescore_on_merge: bool = False,
        merge_consolidate_steps: int = 0,
        merge_retrain_edits: int = 0,
        merge_retrain_pool: int = 0,
        merge_retrain_entries: str = "all",
        retrain_contexts: int = 0,
        batch_edit: bool = True,
        cached_forward: bool = True,
        seed: int = 0,
    ) -> None:
        require_choice(merge_method, "merge_method", MERGE_METHODS)
        require_choice(early_stop_on, "early_stop_on", ("loss", "edit_loss"))
        require_choice(route_on, "route_on", ("sequence", "prompt"))
        require_choice(act_loss_form, "act_loss_form", ("mean", "official"))
        require_choice(threshold_rows, "threshold_rows", ("plain", "all"))
        require_choice(negative_choice, "negative_choice", ("random", "nearest"))
        require_choice(merge_retrain_entries, "merge_retrain_entries", ("all", "new"))
        require_choice(context_style, "context_style", PREFIX_STYLES)
        for name, value in (("mask_ratio", mask_ratio), ("merge_density", merge_density)):
            require(0 < value <= 1, name, "in (0, 1]", value)
        require(0 < calibration_quantile <= 1, "calibration_quantile", "in (0, 1]", calibration_quantile)
        for name, value in (
            ("edits_per_shard", edits_per_shard),
            ("shards_per_merge", shards_per_merge),
            ("merges_per_memory", merges_per_memory),
        ):
            require(value >= 1, name, "at least 1", value)
        for name, value in (("n_iter", n_iter), ("num_irrelevant", num_irrelevant), ("context_length", context_length)):
            require(value >= 1, name, "at least 1", value)
        for name, value in (("lr", lr), ("act_ratio", act_ratio), ("prior_merge_weight", prior_merge_weight)):
            require(value > 0, name, "positive", value)
        counts = {
            "alpha": alpha,
            "beta": beta,
            "gamma": gamma,
            "act_loss_weight": act_loss_weight,
            "weight_bound": weight_bound,
            "early_stop_loss": early_stop_loss,
            "replay": replay,
            "rival_margin": rival_margin,
            "consolidate_steps": consolidate_steps,
            "merge_consolidate_steps": merge_consolidate_steps,
            "merge_retrain_edits": merge_retrain_edits,
            "merge_retrain_pool": merge_retrain_pool,
            "calibration_texts": calibration_texts,
            "shared_directions": shared_directions,
            "subject_negatives": subject_negatives,
            "prompt_negatives": prompt_negatives,
            "route_sketch": route_sketch,
        }
        for name, value in counts.items():
            require(value >= 0, name, "at least 0", value)
        require(route_candidates >= 1, "route_candidates", "at least 1", route_candidates)
        require(not (shard_routers and retrieve), "shard_routers", "false with retrieve: true", shard_routers)
        require(retrieve or merges_per_memory == 1, "merges_per_memory", "1 without retrieve: true", merges_per_memory)
        require(0 <= num_context <= len(PREFIX_SEEDS), "num_context", f"in [0, {len(PREFIX_SEEDS)}]", num_context)
        require(
            0 <= retrain_contexts <= num_context,
            "retrain_contexts",
            f"in [0, num_context={num_context}]",
            retrain_contexts,
        )
        self.layer, self.mask_ratio, self.seed = layer, mask_ratio, seed
        self.edits_per_shard, self.shards_per_merge, self.retrieve = edits_per_shard, shards_per_merge, retrieve
        self.shard_routers, self.merges_per_memory = shard_routers, merges_per_memory
        self.merge_method, self.merge_density, self.prior_merge_weight = merge_method, merge_density, prior_merge_weight
        self.alpha, self.beta, self.gamma, self.act_ratio = alpha, beta, gamma, act_ratio
        self.act_loss_weight, self.act_loss_form, self.weight_bound = act_loss_weight, act_loss_form, weight_bound
        self.lr, self.n_iter, self.early_stop_loss = lr, n_iter, early_stop_loss
        self.early_stop_on = early_stop_on
        self.num_context, self.context_length, self.score_context = num_context, context_length, score_context
        self.context_style = context_style
        self.threshold_rows, self.score_activation, self.keep_route = threshold_rows, score_activation, keep_route
        self.route_on, self.route_sketch, self.route_candidates = route_on, route_sketch, route_candidates
        self.irrelevant_source, self.num_irrelevant = irrelevant_source, num_irrelevant
        self.calibration_texts, self.calibration_quantile = calibration_texts, calibration_quantile
        self.shared_directions, self.subject_negatives = shared_directions, subject_negatives
        self.negative_subjects, self.negative_choice = negative_subjects, negative_choice
        self.prompt_negatives, self.negative_prompts = prompt_negatives, negative_prompts
        self.cached_forward = cached_forward
        self.replay, self.batch_edit, self.consolidate_steps = replay, batch_edit, consolidate_steps
        self.rival_margin = rival_margin
        self.rehearse_shard = rehearse_shard
        self.rescore_on_merge, self.merge_consolidate_steps = rescore_on_merge, merge_consolidate_steps
        self.merge_retrain_edits, self.merge_retrain_entries = merge_retrain_edits, merge_retrain_entries
        self.merge_retrain_pool = merge_retrain_pool
        self.retrain_contexts = retrain_contexts
        self.contexts: list[str] = []

    # set-up -------------------------------------------------------------------------------------

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.adapter.route_on_prompt = self.route_on == "prompt"
        self.adapter.reroute_each_token = not self.keep_route
        self.adapter.score_activation = model_activation(model) if self.score_activation else None
        self.adapter.use_sketch(self.route_sketch, self.route_candidates)
        if self.calibration_texts >= len(self.irrelevant):
            raise ValueError(
                f"strategy.calibration_texts: {self.calibration_texts} held back, but irrelevant_source"
                f" '{self.irrelevant_source}' holds {len(self.irrelevant)} texts and training needs some"
            )
        cut = len(self.irrelevant) - self.calibration_texts
        self.irrelevant, self.calibration = self.irrelevant[:cut], self.irrelevant[cut:]
        # built on first use, kept: the main memory never changes
        self.calibration_forward: FullForward | ProjectedForward | None = None
        self.basis = self.principal_directions(self.irrelevant[:SHARED_DIRECTION_TEXTS], self.shared_directions)
        self.memory = ShardedMemory(
            self.adapter.weight,
            self.edits_per_shard,
            self.shards_per_merge,
            self.mask_ratio,
            self.merge_method,
            self.merge_density,
            self.prior_merge_weight,
            self.basis,
            self.threshold_floor,
            self.seed,
            self.shard_routers,
        )
        self.swap_subjects = read_subjects(self.negative_subjects) if self.subject_negatives else []
        nearest = self.subject_negatives and self.negative_choice == "nearest"
        fingerprint = model_fingerprint(self.model) if nearest or self.prompt_negatives else None
        self.swap_vectors = self.text_vectors(self.swap_subjects, fingerprint) if nearest else None
        self.pool_prompts = read_negative_prompts(self.negative_prompts) if self.prompt_negatives else []
        self.pool_vectors = self.text_vectors(self.pool_prompts, fingerprint) if self.prompt_negatives else None
        self.negatives: dict[int, list[str]] = {}  # the current memory's edits' subject-swapped and listed prompts
        self.activation_memo: dict[tuple[int, ...], Tensor] = {}  # replayed rows' activations, reused
        # (prompt, target) -> the frozen memories' best score, until a spawn freezes another memory
        self.rival_memo: dict[tuple[str, str], float] = {}

    def save_side_memories(self, path: str | Path) -> None:
        """Write the serving side memories alone (safetensors); see `load_side_memories`."""
        save_side_memories(self.adapter, path, self.layer)

    def generate_contexts(self) -> list[str]:
        """Short texts the unedited model writes after seeds like "I" or "Because" (see `context_style`)."""
        return generate_prefixes(
            self.model, self.tokenizer, self.num_context, self.context_length, self.seed, self.context_style
        )

    @torch.no_grad()
    def token_activations(self, texts: list[str]) -> list[Tensor]:
        """The edited layer's input activation at the real tokens of each text ([tokens, in] each)."""
        rows = teacher_forced_batch(self.tokenizer, texts, [""] * len(texts)).to(self.model.device)
        return CachedForward(self.model, self.adapter, rows, self.layer).tail

    def text_vectors(self, texts: list[str], fingerprint: str | None = None) -> Tensor:
        """Unit vectors ([texts, in]) of the edited layer's input at each text's last token, the text read alone,
        without the shared directions. With the model's `fingerprint` (fixed lists of texts), the inputs are
        kept in the user cache."""
        if fingerprint is None:
            inputs = self.last_inputs(texts)
        else:
            key = [self.layer, texts]
            inputs = cached_tensor(fingerprint, "last_token_inputs", key, lambda: self.last_inputs(texts))
        return F.normalize(project_out(inputs, self.basis), dim=-1)

    def last_inputs(self, texts: list[str], chunk: int = 256) -> Tensor:
        """The edited layer's input ([texts, in]) at each text's last token, the text read alone."""
        chunks = (self.token_activations(texts[start : start + chunk]) for start in range(0, len(texts), chunk))
        return torch.stack([a[-1] for activations in chunks for a in activations])

    def principal_directions(self, texts: list[str], count: int) -> Tensor | None:
        """The `count` leading eigenvectors ([in, count]) of the second moment of the edited layer's input
        over the real tokens of `texts` (None for 0)."""
        if not count:
            return None
        tokens = torch.cat(self.token_activations(texts)).double()
        values, vectors = torch.linalg.eigh(tokens.T @ tokens)
        return vectors[:, values.argsort(descending=True)[:count]].to(self.adapter.weight.dtype)

    # editing ------------------------------------------------------------------------------------

    def edit(self, batch: EditBatch) -> dict[str, float]:
        if not self.batch_edit and len(batch) > 1:
            stats = [self.edit(EditBatch([i], [r])) for i, r in zip(batch.indices, batch.requests, strict=True)]
            return mean_stats(stats)
        if len(self.contexts) < self.num_context:
            self.contexts = self.generate_contexts()
        for index, request in zip(batch.indices, batch.requests, strict=True):
            self._add_negatives(index, request.prompt, request.subject)
        prompts, targets, context_lengths = self.edit_rows(batch.requests, self.contexts)
        rows_per_edit, new_rows = 1 + len(self.contexts), len(prompts)
        memory = self.memory
        if self.rehearse_shard:
            prompts += [edit.prompt for edit in memory.shard_edits]
            targets += [edit.target for edit in memory.shard_edits]
            context_lengths += [0] * len(memory.shard_edits)
        stats, scores = self._train(prompts, targets, context_lengths, batch.indices, self.n_iter)
        new_scores = self.threshold_scores(scores[:new_rows], rows_per_edit)
        # with rehearsal the rows hold every edit of the shard, so their minimum replaces the running one
        current = torch.cat([new_scores, scores[new_rows:]]).min().item()
        shard_min_score = current if self.rehearse_shard else min(memory.shard_min_score, current)
        edits = [Edit(i, r.prompt, r.target) for i, r in zip(batch.indices, batch.requests, strict=True)]
        memory.add(edits, shard_min_score)
        if self.consolidate_steps:  # logged at every edit (0 when the shard is not full), or Lightning repeats it
            stats["consolidation_steps"] = 0
            if memory.shard_full():
                stats["consolidation_steps"], scores = self.consolidate(memory.shard_edits, self.consolidate_steps)
                memory.shard_min_score = scores.min().item()
        self.publish()
        return stats

    def edit_rows(
        self, edits: Sequence[Edit | EditRequest], contexts: list[str]
    ) -> tuple[list[str], list[str], list[int]]:
        """Training rows for `edits`: each one's plain prompt, then one copy per context with the
        context before the prompt; the rows' prompts, targets and context lengths in tokens (0 for plain rows)."""
        lengths = {context: len(self.tokenizer(context)["input_ids"]) for context in contexts}
        rows = [
            (f"{c} {edit.prompt}" if c else edit.prompt, edit.target, lengths.get(c, 0))
            for edit in edits
            for c in ("", *contexts)
        ]
        prompts, targets, context_lengths = (list(column) for column in zip(*rows, strict=True))
        return prompts, targets, context_lengths

    def threshold_scores(self, scores: Tensor, rows_per_edit: int) -> Tensor:
        """Per edit, the score its threshold counts, from its rows' scores in `edit_rows` order: the plain row's,
        or (`threshold_rows: all`) the mean of its rows'."""
        scores = scores.view(-1, rows_per_edit)
        return scores.mean(1) if self.threshold_rows == "all" else scores[:, 0]

    def _add_negatives(self, index: int, prompt: str, subject: str | None) -> None:
        """Keep the edit's negatives: `subject_negatives` copies of `prompt` with other subjects in place of
        `subject`, and the `prompt_negatives` listed prompts read most like `prompt`."""
        negatives = self._swapped_subjects(index, prompt, subject) + self._nearest_prompts(prompt, subject)
        if negatives:  # none (the default): no work per edit and nothing added to the checkpoint
            self.negatives[index] = negatives

    def _swapped_subjects(self, index: int, prompt: str, subject: str | None) -> list[str]:
        """`subject_negatives` copies of `prompt` with listed subjects in place of `subject` (see `negative_choice`)."""
        if not self.subject_negatives or not subject or subject not in prompt:
            return []
        others = [i for i, other in enumerate(self.swap_subjects) if other != subject]
        count = min(self.subject_negatives, len(others))
        if self.swap_vectors is None:
            picked = random.Random(self.seed * 100_003 + index).sample(others, count)
        else:
            similarity = self.swap_vectors[others] @ self.text_vectors([subject])[0]
            picked = [others[i] for i in similarity.topk(count).indices.tolist()]
        return [prompt.replace(subject, self.swap_subjects[i]) for i in picked]

    def _nearest_prompts(self, prompt: str, subject: str | None) -> list[str]:
        """The `prompt_negatives` listed prompts closest to `prompt` (cosine of `text_vectors`), none that mentions
        its subject."""
        if not self.prompt_negatives:
            return []
        similarity = self.pool_vectors @ self.text_vectors([prompt])[0]
        if subject:
            mentions = torch.tensor([subject in text for text in self.pool_prompts], device=similarity.device)
            similarity = similarity.masked_fill(mentions, -math.inf)
        count = min(self.prompt_negatives, int(similarity.isfinite().sum()))
        return [self.pool_prompts[i] for i in similarity.topk(count).indices.tolist()]

    def consolidate(
        self, edits: list[Edit], n_iter: int, tau: Tensor | None = None, mask: Tensor | None = None, replay: bool = True
    ) -> tuple[int, Tensor]:
        """Train `tau` (default the open shard's, in its mask) on `edits` together, their plain prompts and
        `retrain_contexts` context rows each; the steps taken and the edits' threshold scores afterwards
        (`replay`: with the replayed prompts as negatives)."""
        contexts = self.contexts[: self.retrain_contexts]
        prompts, targets, context_lengths = self.edit_rows(edits, contexts)
        # no memo: its score-only rows (every edit's irrelevant texts and negatives) would not come back,
        # and the memo would keep them in the next checkpoint
        indices = [edit.index for edit in edits]
        stats, scores = self._train(
            prompts, targets, context_lengths, indices, n_iter, tau, mask, use_memo=False, replay=replay
        )
        return stats["steps"], self.threshold_scores(scores, 1 + len(contexts))

    def _train(
        self,
        prompts: list[str],
        targets: list[str],
        context_lengths: list[int],
        indices: list[int],
        n_iter: int,
        tau: Tensor | None = None,
        mask: Tensor | None = None,
        use_memo: bool = True,
        replay: bool = True,
    ) -> tuple[dict[str, float], Tensor]:
        """Train `tau` (default the open shard's, in its mask) on the edit rows (prompt -> target) against
        the irrelevant samples of `indices` and the replayed prompts, and (`rival_margin`) the plain rows
        above and the replayed rows below the frozen memories' best score; the loop's statistics and the edit
        rows' scores afterwards. `use_memo`: reuse score-only rows' activations from the strategy's memo and
        leave this call's there."""
        tau, mask = (self.memory.tau, self.memory.mask) if tau is None else (tau, mask)
        n = self.num_irrelevant
        irrelevant = [self.irrelevant[(i * n + j) % len(self.irrelevant)] for i in indices for j in range(n)]
        irrelevant += [negative for i in indices for negative in self.negatives.get(i, [])]
        replayed = self.memory.replay_prompts[-self.replay :] if self.replay and replay else []
        irrelevant += replayed
        rows = teacher_forced_batch(self.tokenizer, prompts + irrelevant, targets + [""] * len(irrelevant)).to(
            self.model.device
        )
        score_mask = self.score_mask(rows).clone()
        if not self.score_context:
            for row, length in enumerate(context_lengths):
                score_mask[row, :length] = 0
        forward = self._forward(rows, score_mask, self.activation_memo if use_memo else None)
        n_edit = len(prompts)
        plain = [row for row, length in enumerate(context_lengths) if length == 0]
        rival_rows = plain + list(range(len(rows.input_ids) - len(replayed), len(rows.input_ids)))
        sign = torch.tensor([1.0] * len(plain) + [-1.0] * len(replayed), device=self.model.device)
        rivals = self.rival_scores(
            [prompts[r] for r in plain] + replayed, [targets[r] for r in plain] + [""] * len(replayed)
        )

        def loss_fn(logits: Tensor, scores: Tensor) -> dict[str, Tensor]:
            edit_loss = edit_nll(logits, rows, n_edit).mean()
            act_loss = self.activation_loss(scores[:n_edit], scores[n_edit:])
            if rivals is not None:  # edit rows above the frozen memories' best score, replayed rows below it
                act_loss = act_loss + F.relu(sign * (rivals - scores[rival_rows]) + self.rival_margin).mean()
            loss = edit_loss + self.act_loss_weight * act_loss
            return {"loss": loss, "edit_loss": edit_loss, "act_loss": act_loss}

        stats = optimise(
            forward, tau, loss_fn, self.lr, n_iter, self.early_stop_loss, mask, self.early_stop_on, self.weight_bound
        )
        return stats, forward.scores(tau)[:n_edit]

    def score_mask(self, rows: TeacherForcedBatch) -> Tensor:
        """The tokens an activation score averages over: every real token, or the prompt's (`route_on`)."""
        return rows.prompt_mask() if self.route_on == "prompt" else rows.attention_mask

    def _forward(
        self, rows: TeacherForcedBatch, score_mask: Tensor | None = None, memo: dict | None = None, project: bool = True
    ) -> FullForward | ProjectedForward:
        if self.cached_forward:
            forward = CachedForward(self.model, self.adapter, rows, self.layer, score_mask, memo)
        else:
            forward = FullForward(self.model, self.adapter, rows, score_mask)
        return forward if self.basis is None or not project else ProjectedForward(forward, self.basis)

    def edit_scores(self, tau: Tensor, edits: list[Edit]) -> Tensor:
        """The activation score of each edit (index, prompt, target) under `tau`."""
        _, prompts, targets = zip(*edits, strict=True)
        return self.row_scores([tau], list(prompts), list(targets))[0]

    @torch.no_grad()
    def edit_losses(self, tau: Tensor, edits: list[Edit]) -> Tensor:
        """Each edit's mean target NLL on its plain prompt with `tau` answering."""
        _, prompts, targets = zip(*edits, strict=True)
        losses = [
            edit_nll(forward(tau)[0], rows, len(rows.input_ids)) for rows, forward in self.forwards(prompts, targets)
        ]
        return torch.cat(losses)

    def rival_scores(self, prompts: list[str], targets: list[str]) -> Tensor | None:
        """The highest score a frozen memory gives each row (None when `rival_margin` is off or none is frozen)."""
        frozen = self.memory.frozen
        if not self.rival_margin or not frozen or not prompts:
            return None
        rows = list(zip(prompts, targets, strict=True))
        missing = list(dict.fromkeys(row for row in rows if row not in self.rival_memo))
        if missing:  # replayed and rehearsed rows come back every edit until the next spawn
            new_prompts, new_targets = (list(column) for column in zip(*missing, strict=True))
            taus = [memory.tau for memory in frozen]
            scores = self.row_scores(taus, new_prompts, new_targets, project=False).amax(0)
            self.rival_memo.update(zip(missing, scores.tolist(), strict=True))
        return torch.tensor([self.rival_memo[row] for row in rows], device=self.model.device)

    @torch.no_grad()
    def row_scores(
        self, taus: list[Tensor], prompts: list[str], targets: list[str], batch_size: int = 32, project: bool = True
    ) -> Tensor:
        """The activation score of each (prompt, target) row under each task vector, [taus, rows]. `project=False`
        for task vectors blind to the shared directions already (frozen memories): no second projection."""
        forwards = self.forwards(prompts, targets, batch_size, project)
        return torch.cat([torch.stack([forward.scores(tau) for tau in taus]) for _, forward in forwards], dim=1)

    def forwards(
        self, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32, project: bool = True
    ) -> Iterator[tuple[TeacherForcedBatch, FullForward | ProjectedForward]]:
        """The (prompt, target) rows in batches of `batch_size`, each with its forward (scores on `score_mask`)."""
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            rows = teacher_forced_batch(self.tokenizer, list(prompts[part]), list(targets[part])).to(self.model.device)
            yield rows, self._forward(rows, self.score_mask(rows), project=project)

    def activation_loss(self, edit_scores: Tensor, irrelevant_scores: Tensor) -> Tensor:
        """Margin loss: edit rows score high (> beta), irrelevant rows low (< alpha), gap > gamma."""
        if self.act_loss_form == "official":
            gaps = irrelevant_scores[:, None] - edit_scores[None, :] + self.gamma
            hinges = (gaps, irrelevant_scores - self.alpha, self.beta - edit_scores)
            return sum(violating_mean(hinge) for hinge in hinges)
        d_i = irrelevant_scores.mean()
        return (
            F.relu(d_i - edit_scores + self.gamma).mean()
            + F.relu(irrelevant_scores - self.alpha).mean()
            + F.relu(self.beta - edit_scores).mean()
        )

    # memory lifecycle (run by the callbacks in wise_cl.callbacks) ---------------------------------

    def shard_full(self) -> bool:
        return self.memory.shard_full()

    def close_shard(self) -> None:
        """Keep the finished shard for merging; the next edits train a new random subspace."""
        self.memory.close_shard()
        self.publish()

    def group_full(self) -> bool:
        return self.memory.group_full()

    def merge(self) -> None:
        """Merge the closed shards into the side memory; optionally retrain or re-score it after."""
        memory = self.memory
        memory.merge()
        if self.merge_consolidate_steps and memory.edits:
            merged = memory.merged.clone().requires_grad_(True)
            mask = (memory.merged != 0).to(memory.mask.dtype)
            if self.merge_retrain_entries == "new":  # the merged group's shards' subspaces
                group = range(memory.shard_index - self.shards_per_merge, memory.shard_index)
                mask = mask * torch.stack([memory.shard_mask(i) for i in group]).amax(0)
            # with shard routers the replayed prompts are the merged memory's own edits
            edits, replay = self.retraining_edits(), not self.shard_routers
            _, scores = self.consolidate(edits, self.merge_consolidate_steps, merged, mask, replay)
            memory.merged = merged.detach()
            memory.closed_min_score = scores.min().item()
        elif self.rescore_on_merge and memory.edits:
            memory.closed_min_score = self.edit_scores(memory.merged, memory.edits).min().item()
        self.publish()

    def retraining_edits(self) -> list[Edit]:
        """The edits a merge retrains on: all the memory's, or (`merge_retrain_edits`) the merged group's
        own and a sample of the older ones, drawn with the run's seed and the memory's size (with
        `merge_retrain_pool`, the worst answered of a larger sample)."""
        edits, cap = self.memory.edits, self.merge_retrain_edits
        if not cap or len(edits) <= cap:
            return edits
        newest = min(cap, self.edits_per_shard * self.shards_per_merge)
        older, wanted = len(edits) - newest, cap - newest
        sample = random.Random(self.seed * 100_003 + len(edits)).sample
        if not self.merge_retrain_pool:
            picked = sample(range(older), wanted)
        else:
            pool = sample(range(older), min(older, max(wanted, self.merge_retrain_pool)))
            losses = self.edit_losses(self.memory.merged, [edits[i] for i in pool])
            picked = [pool[i] for i in losses.topk(wanted).indices.tolist()]
        return [edits[i] for i in sorted(picked)] + edits[older:]

    def memory_complete(self) -> bool:
        """WISE-Retrieve: the current memory has taken its `merges_per_memory` merges, so it is ready to freeze."""
        capacity = self.edits_per_shard * self.shards_per_merge * self.merges_per_memory
        return self.memory.merged is not None and len(self.memory.edits) >= capacity

    def spawn(self) -> None:
        """WISE-Retrieve: freeze the merged memory with its threshold and start an empty one."""
        if self.memory.merged is None:
            return
        self.memory.spawn()
        self.negatives, self.rival_memo = {}, {}
        self.publish()

    def threshold_floor(self, tau: Tensor) -> float:
        """`calibration_quantile` of the memory's scores on the held-back irrelevant texts (-inf if none)."""
        if not self.calibration:
            return -math.inf
        if self.calibration_forward is None:
            rows = teacher_forced_batch(self.tokenizer, self.calibration, [""] * len(self.calibration))
            self.calibration_forward = self._forward(rows.to(self.model.device))
        return torch.quantile(self.calibration_forward.scores(tau).float(), self.calibration_quantile).item()

    def publish(self) -> None:
        """Serve the memory's task vectors with their thresholds (`act_ratio` of each one's smallest edit
        score, at least its floor)."""
        memories, answers = self.memory.serving()
        self.adapter.serve([m.tau for m in memories], [m.threshold(self.act_ratio) for m in memories], answers)

    def callbacks(self) -> list[Any]:
        memory = [KnowledgeSharding(), KnowledgeMerging()]
        return memory + [MemorySpawning()] if self.retrieve else memory

    def describe(self) -> dict[str, Any]:
        return {
            "merge_method": self.merge_method,
            "num_side_memories": len(self.adapter.taus),
            "layer": self.layer,
            "subspace_overlap": self.memory.subspace_overlap(),
        }

    # checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # the memo too: activations computed in another batch differ in the last bits, so a resumed run that
        # recomputed them would drift from an uninterrupted one
        memo = [(list(tokens), activation) for tokens, activation in self.activation_memo.items()]
        return {
            **self.memory.state_dict(),
            "contexts": list(self.contexts),
            "negatives": dict(self.negatives),
            "activation_memo": memo,
            "rival_memo": [[*row, score] for row, score in self.rival_memo.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)
        self.contexts = list(state["contexts"])
        self.negatives = dict(state["negatives"])
        self.activation_memo = {tuple(tokens): activation for tokens, activation in state.get("activation_memo", [])}
        self.rival_memo = {(prompt, target): score for prompt, target, score in state.get("rival_memo", [])}
        self.publish()


def violating_mean(hinge: Tensor) -> Tensor:
    """The mean of the positive entries of `hinge` (0 when there are none), as the paper's code reduces a hinge."""
    violating = hinge[hinge > 0]
    return violating.mean() if violating.numel() else hinge.new_zeros(())


def model_activation(model: PreTrainedModel) -> str:
    """The name of the model's MLP activation function (`hidden_act`, or GPT-2's `activation_function`)."""
    name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation_function", None)
    if not isinstance(name, str):
        raise ValueError(
            f"strategy.score_activation: the model's config ({type(model.config).__name__}) names no activation"
            " function (hidden_act); set score_activation: false"
        )
    return name
