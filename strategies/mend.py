"""MEND (Mitchell et al., 2022, "Fast Model Editing at Scale"): a trained hypernetwork turns the gradient of
an edit's loss into a weight change, for a few MLP output projections.

For a Linear layer the gradient of the loss is a sum of rank-one terms, dL/dW = sum_t delta_t u_t^T (u_t the
layer input at token t, delta_t the gradient at its output). MEND never forms that matrix: it passes each
token's (u_t, delta_t) through a small network (normalised, a per-layer scale and shift, then a low-rank
residual MLP) and applies W' = W - lr_l * sum_t delta~_t u~_t^T with a learned step size per layer. The
network is trained beforehand (`python -m wise_cl.benchmarks.train_mend`) so that the changed model gives
the new answer on rephrasings and keeps its predictions elsewhere. Edits accumulate: each one's gradient is
taken on the model the earlier ones left. The changes are served as side memories without a router.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from wise_cl.data import EditBatch
from wise_cl.evaluation import scored_logits
from wise_cl.optimisation import edit_nll
from wise_cl.records import resource_path
from wise_cl.rows import TeacherForcedBatch, teacher_forced_batch
from wise_cl.side_memory import attach_side_memory, detach_side_memory
from wise_cl.strategies.base import EditStrategy, ServedTaskVectors
from wise_cl.strategies.memit import consecutive_layers
from wise_cl.validation import require

BUNDLED_EDITOR = "mend/smollm2-135m.safetensors"


class GradientEditor(nn.Module):
    """MEND's network for `num_layers` Linear layers of one shape: maps each token's gradient factors
    (u, delta) of layer `l` to (u~, delta~) and returns the weight change lr_l * delta~^T u~.

    The factors are standardised with running statistics (updated while training), scaled and shifted per
    layer, then `z + up(relu(down(z)))`; `up` starts at zero, so an untrained editor returns the layer's
    (standardised) gradient times its step size.
    """

    def __init__(self, in_features: int, out_features: int, num_layers: int, rank: int = 128, lr: float = 1e-4):
        super().__init__()
        width = in_features + out_features
        self.in_features = in_features
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(num_layers, width))
        self.shift = nn.Parameter(torch.zeros(num_layers, width))
        self.lrs = nn.Parameter(torch.full((num_layers,), lr))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("sum_squares", torch.zeros(width, dtype=torch.float64))

    def observe(self, factors: Tensor) -> None:
        """Fold a batch of factor rows ([tokens, width]) into the running mean and variance (Chan et al.)."""
        rows = factors.detach().double()
        n, batch_mean = rows.shape[0], rows.mean(0)
        delta, total = batch_mean - self.mean, self.count + n
        self.sum_squares += ((rows - batch_mean) ** 2).sum(0) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    def standardised(self, factors: Tensor) -> Tensor:
        if self.count < 2:
            return factors
        std = (self.sum_squares / (self.count - 1)).sqrt().clamp(min=1e-12)
        return ((factors - self.mean) / std).to(factors.dtype)

    def forward(self, inputs: Tensor, grads: Tensor, layer: int) -> Tensor:
        """The change for layer `layer` ([out, in]) from its inputs ([tokens, in]) and output gradients."""
        z = self.standardised(torch.cat([inputs, grads], -1)) * self.scale[layer] + self.shift[layer]
        z = z + self.up(F.relu(self.down(z)))
        u, delta = z.split([self.in_features, z.shape[-1] - self.in_features], -1)
        return self.lrs[layer] * delta.T @ u


class MEND(ServedTaskVectors, EditStrategy):
    """MEND over `num_layers` consecutive MLP output projections ending at `layer` (see the module docstring).

    Args:
        layer: the last edited projection.
        num_layers: consecutive layers edited, ending at `layer`.
        editor: the trained network's safetensors file, or `bundled` (trained for the bundled SmolLM2 by
            `python -m wise_cl.benchmarks.train_mend`; see `wise_cl/resources/mend/README.md`).
        rank: the network's hidden width (for a new, untrained editor).
    """

    name = "mend"

    def __init__(
        self,
        layer: str = "model.layers.29.mlp.down_proj",
        num_layers: int = 3,
        editor: str | None = "bundled",
        rank: int = 128,
    ) -> None:
        require(num_layers >= 1, "num_layers", "at least 1", num_layers)
        require(rank >= 1, "rank", "at least 1", rank)
        self.layer, self.num_layers, self.editor_path, self.rank = layer, num_layers, editor, rank
        self.layers = consecutive_layers(layer, num_layers)

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().prepare(model, tokenizer)
        self.adapters = {layer: attach_side_memory(model, layer) for layer in self.layers}
        shapes = {tuple(adapter.weight.shape) for adapter in self.adapters.values()}
        require(len(shapes) == 1, "layer", "layers of one shape (one editor serves them all)", shapes)
        out_features, in_features = shapes.pop()
        weight = self.adapters[self.layer].weight
        self.editor = GradientEditor(in_features, out_features, len(self.layers), self.rank).to(weight)
        if self.editor_path is not None:
            self.load_editor(self.editor_path)
        self.editor.requires_grad_(False)
        self.taus = {layer: torch.zeros_like(adapter.weight) for layer, adapter in self.adapters.items()}
        self.edits = 0

    def detach(self) -> None:
        for layer in self.layers:
            detach_side_memory(self.model, layer)

    # the editor's file ----------------------------------------------------------------------------

    def editor_file(self, path: str) -> Path:
        return resource_path(BUNDLED_EDITOR) if path == "bundled" else Path(path)

    def load_editor(self, path: str) -> None:
        """Load trained weights, refused (naming the file) when made for other layers or shapes."""
        file = self.editor_file(path)
        if not file.is_file():
            raise ValueError(
                f"strategy.editor: {file} not found; train one with `python -m wise_cl.benchmarks.train_mend`"
            )
        with safe_open(str(file), framework="pt") as f:
            layers = json.loads((f.metadata() or {}).get("layers", "[]"))
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if layers != self.layers:
            raise ValueError(f"strategy.editor: {file} was trained for layers {layers}, not {self.layers}")
        shapes = {key: tuple(value.shape) for key, value in self.editor.state_dict().items()}
        if {key: tuple(value.shape) for key, value in state.items()} != shapes:
            raise ValueError(f"strategy.editor: {file} holds another network shape (rank or layer size) than {shapes}")
        self.editor.load_state_dict(state)

    def save_editor(self, path: str | Path) -> None:
        """Write the network's weights and the layers it serves (safetensors)."""
        tensors = {key: value.detach().contiguous().cpu() for key, value in self.editor.state_dict().items()}
        save_file(tensors, str(path), metadata={"layers": json.dumps(self.layers), "rank": str(self.rank)})

    # editing ------------------------------------------------------------------------------------

    def edit_rows(self, requests: list) -> TeacherForcedBatch:
        prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
        return teacher_forced_batch(self.tokenizer, prompts, targets).to(self.model.device)

    @contextmanager
    def changed(self, changes: dict[str, Tensor]) -> Iterator[None]:
        """Within the block every edited layer computes with its task vector minus `changes[layer]`."""
        with ExitStack() as stack:
            for layer, adapter in self.adapters.items():
                stack.enter_context(adapter.trained_with(self.taus[layer] - changes[layer]))
            yield

    def gradient_factors(self, rows: TeacherForcedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        """Per edited layer, the inputs and output gradients of the edit rows' target NLL at their real tokens."""
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}

        def keep(layer: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                inputs[layer], outputs[layer] = args[0], out

            return hook

        # a zero change that requires grad makes every edited layer's output part of the graph
        probes = {layer: torch.zeros_like(tau, requires_grad=True) for layer, tau in self.taus.items()}
        with ExitStack() as stack:
            stack.enter_context(self.changed(probes))
            for layer, adapter in self.adapters.items():
                stack.callback(adapter.register_forward_hook(keep(layer)).remove)
            loss = edit_nll(self.logits(rows), rows, len(rows.input_ids)).mean()
        grads = torch.autograd.grad(loss, [outputs[layer] for layer in self.layers])
        real = rows.attention_mask.bool()
        return {layer: (inputs[layer][real].detach(), g[real]) for layer, g in zip(self.layers, grads, strict=True)}

    def logits(self, rows: TeacherForcedBatch) -> Tensor:
        """Logits at the scored positions."""
        return scored_logits(self.model, rows)

    def changes(self, factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """The editor's weight change per layer (to subtract)."""
        return {layer: self.editor(*factors[layer], index) for index, layer in enumerate(self.layers)}

    def edit(self, batch: EditBatch) -> dict[str, float]:
        rows = self.edit_rows(batch.requests)
        changes = self.changes(self.gradient_factors(rows))
        with torch.no_grad():
            for layer, change in changes.items():
                self.taus[layer] -= change
        self.publish()
        self.edits += len(batch)
        with torch.no_grad():
            loss = edit_nll(self.logits(rows), rows, len(rows.input_ids)).mean()
        return {
            "edit_loss": float(loss),
            "change_norm": float(torch.stack([c.norm() for c in changes.values()]).norm()),
        }
