"""``hyperlora import sakana-d2l|sakana-t2l``: Sakana's released checkpoints to our format.

Input: their Doc-to-LoRA ``checkpoint-*/pytorch_model.bin`` (a pickle, read with
``safe_pickle``) or a Text-to-LoRA run directory (``hypermod.pt`` + ``args.yaml`` +
``adapter_config.json``). Output: our ``config.json`` + ``model.safetensors`` (float32, the
weights unchanged), loadable with ``HyperLoRAModel.from_pretrained(base, d2l=OUT)`` / ``t2l=OUT``.

Every field the generators need is read from the checkpoint and cross-checked against the tensor
shapes; what our re-implementation does not cover (other context encoders or aggregators, one-hot
or quantised task encoders, ...) is refused with ``CheckpointError`` rather than guessed.
The base model's architecture fingerprint comes from ``base_config`` (a local model folder) when
given, else from a table of the models Sakana released for.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, InvalidInputError
from ..lora import LoraSpec
from . import checkpoint
from .safe_pickle import PickledEnum, PickledRecord, as_plain, load_checkpoint

# model_type:L<layers>:H<hidden>:I<intermediate>:V<vocab> of the bases Sakana released for
KNOWN_FINGERPRINTS = {
    "google/gemma-2-2b-it": "gemma2:L26:H2304:I9216:V256000",
    "Qwen/Qwen3-4B-Instruct-2507": "qwen3:L36:H2560:I9728:V151936",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral:L32:H4096:I14336:V32000",
    "meta-llama/Llama-3.1-8B-Instruct": "llama:L32:H4096:I14336:V128256",
}


def _fingerprint(base_model: str, base_config: str | os.PathLike | None) -> str:
    if base_config is not None:
        from transformers import AutoConfig

        try:
            c = AutoConfig.from_pretrained(str(base_config))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the base model config at {base_config}: {exc}") from exc
        c = getattr(c, "text_config", None) or c
        return f"{c.model_type}:L{c.num_hidden_layers}:H{c.hidden_size}:I{getattr(c, 'intermediate_size', 0)}:V{c.vocab_size}"
    if base_model in KNOWN_FINGERPRINTS:
        return KNOWN_FINGERPRINTS[base_model]
    raise CheckpointError(
        f"unknown base model {base_model!r}: pass base_config (--base-config) pointing at a local copy of it"
    )


def _same_family(recorded: str, fp: str) -> None:
    """A base config of another model type than the released model the checkpoint names is a mistake."""
    known = KNOWN_FINGERPRINTS.get(recorded)
    if known and known.split(":")[0] != fp.split(":")[0]:
        raise CheckpointError(
            f"the checkpoint was trained for {recorded} ({known.split(':')[0]}), the base config given is a "
            f"{fp.split(':')[0]} model"
        )


def _check_fingerprint(fp: str, layers: int, hidden: int, shapes: dict[str, tuple[int, int]]) -> str:
    """Sizes in the checkpoint against the base model's; returns its model_type."""
    model_type, *rest = fp.split(":")
    fields = {p[0]: int(p[1:]) for p in rest if p[:1] in ("L", "H", "I", "V") and p[1:].isdigit()}
    if fields.get("L") != layers or fields.get("H") != hidden:
        raise CheckpointError(
            f"the checkpoint is for {layers} layers of width {hidden}, its base model ({fp}) is not: check --base-config"
        )
    mlp = fields.get("I")
    for m, (d_in, d_out) in shapes.items():
        if (m == "down_proj" and d_in != mlp) or (m in ("up_proj", "gate_proj") and d_out != mlp):
            raise CheckpointError(f"{m} of the checkpoint is {d_in}->{d_out}; the base model's MLP width is {mlp}")
    return model_type


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"unsupported Sakana checkpoint: {what}")


def _load_strict(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected.keys() & state.keys() if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match the architecture its config describes: missing={missing[:4]} "
            f"unexpected={unexpected[:4]} wrong shapes={wrong[:4]}"
        )
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def _tensors(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor {key!r} is not finite floating point")
        out[key.removeprefix("_orig_mod.")] = value
    return out


# --------------------------------------------------------------------------- Doc-to-LoRA
def _d2l_file(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"no such file or directory: {path} (expected pytorch_model.bin or its checkpoint folder)"
        )
    if path.is_dir():
        found = sorted(path.glob("pytorch_model.bin")) or sorted(path.glob("checkpoint-*/pytorch_model.bin"))
        if not found:
            raise CheckpointError(f"no pytorch_model.bin in {path} or its checkpoint-* folders")
        return found[-1]
    return path


def convert_d2l(
    path: str | os.PathLike,
    *,
    base_config: str | os.PathLike | None = None,
    base_model: str | None = None,
    chunk_len: int | None = None,
):
    """Their D2L checkpoint -> a loaded ``SakanaDocToLoRA`` (not saved; see ``import_d2l``)."""
    from .sakana_d2l import SakanaD2LConfig, SakanaDocToLoRA
    from .sakana_templates import FAMILY_OF_MODEL_TYPE

    file = _d2l_file(Path(path))
    raw = load_checkpoint(file)
    _require(isinstance(raw, dict), "the pickle is not a dict")
    meta_keys = {"base_model_name_or_path", "hypernet_config", "ctx_encoder_args"}
    _require(meta_keys <= set(raw), f"missing {sorted(meta_keys - set(raw))} (not a Doc-to-LoRA checkpoint?)")
    recorded, hc, ctx = raw["base_model_name_or_path"], raw["hypernet_config"], raw["ctx_encoder_args"]
    _require(isinstance(recorded, str) and recorded, "base_model_name_or_path is not a name")
    _require(isinstance(hc, PickledRecord) and hc.qualname.endswith("HypernetConfig"), "hypernet_config")
    _require(isinstance(ctx, PickledRecord), "ctx_encoder_args")
    agg, lora = hc.get("aggregator_config"), hc.get("lora_config")
    _require(isinstance(agg, PickledRecord) and isinstance(lora, PickledRecord), "aggregator or LoRA config")

    def val(x: Any) -> Any:
        return x.value if isinstance(x, PickledEnum) else x

    _require(
        val(ctx.get("ctx_encoder_type")) == "per_layer_activations", "context encoder other than per-layer activations"
    )
    _require(
        ctx.get("ctx_encoder_model_name_or_path") in (None, recorded), "a context encoder other than the base model"
    )
    _require(ctx.get("ctx_encoder_last_layer") is None, "a truncated context encoder (ctx_encoder_last_layer)")
    _require(val(agg.get("aggregator_type")) == "perceiver", "aggregator other than the Perceiver")
    _require(bool(agg.get("layer_to_layer_ctx_encoder")), "aggregator not run per layer")
    _require(bool(hc.get("per_rank_gen")), "per_rank_gen=False")
    _require(not hc.get("extra_modules") and not agg.get("num_extra_modules"), "extra (layernorm) modules")
    _require(not hc.get("use_token_mixing") and not hc.get("use_light_weight_lora"), "token mixing / light-weight LoRA")

    targets = sorted(as_plain(lora.get("target_modules")) or [])
    rank = int(lora.get("r"))
    alpha = float(lora.get("lora_alpha"))
    d_in, d_out = as_plain(hc.get("feature_sizes"))
    shapes = {m: (int(d_in[m]), int(d_out[m])) for m in targets}
    layers = len(as_plain(hc.get("layer_indices")))
    hidden = int(hc.get("base_hidden_size"))
    _require(layers == int(agg.get("num_layers")) and hidden == int(agg.get("feature_size")), "inconsistent sizes")
    base_name = base_model or recorded
    fp = _fingerprint(recorded, base_config)
    _same_family(recorded, fp)
    model_type = _check_fingerprint(fp, layers, hidden, shapes)
    _require(model_type in FAMILY_OF_MODEL_TYPE, f"base model type {model_type!r} (no Doc-to-LoRA template for it)")
    pre = hc.get("num_pre_head_layers")
    config = SakanaD2LConfig(
        base_model=base_name,
        base_fingerprint=fp,
        num_layers=layers,
        hidden_size=hidden,
        module_shapes=shapes,
        lora=LoraSpec(target_modules=tuple(targets), rank=rank, alpha=alpha * rank),
        latent_dim=int(hc.get("latent_size")),
        family=FAMILY_OF_MODEL_TYPE[model_type],
        n_latent_queries=int(agg.get("n_latent_queries")),
        num_blocks=int(agg.get("num_blocks")),
        num_self_attn_per_block=int(agg.get("num_self_attn_per_block")),
        shared_weights=bool(agg.get("shared_weights")),
        per_layer_processing=bool(hc.get("per_layer_processing")),
        num_pre_head_layers=4 if pre is None else int(pre),  # their from_state_dict default
        use_bias=True if hc.get("use_bias") is None else bool(hc.get("use_bias")),
        quantized_ctx_encoder=bool(ctx.get("quantize_ctx_encoder")),
        source=str(file),
        **({"chunk_len": chunk_len} if chunk_len is not None else {}),
    )
    state = _tensors({k: v for k, v in raw.items() if k not in meta_keys}, str(file))
    net = SakanaDocToLoRA(config)
    _load_strict(net, state, str(file))
    return net.eval().requires_grad_(False)


def import_d2l(path: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> Path:
    """Convert and save; ``kwargs`` as ``convert_d2l``."""
    net = convert_d2l(path, **kwargs)
    return checkpoint.save(net, out, dtype=torch.float32, extra={"converted_from": "sakana-d2l"})


# --------------------------------------------------------------------------- Text-to-LoRA
def _read_small(path: Path, limit: int = 2**20) -> str:
    from ..lora.adapter import read_regular_file

    try:
        return read_regular_file(path, max_bytes=limit, what="Text-to-LoRA metadata").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8: {exc}") from None


def convert_t2l(
    run_dir: str | os.PathLike,
    *,
    base_config: str | os.PathLike | None = None,
    base_model: str | None = None,
    module_order: list[str] | None = None,
):
    """Their T2L run directory -> a loaded ``SakanaTextToLoRA``."""
    import yaml

    from .sakana_t2l import SakanaT2LConfig, SakanaTextToLoRA

    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    try:
        args = yaml.safe_load(_read_small(run_dir / "args.yaml"))
        peft = json.loads(_read_small(run_dir / "adapter_config.json"))
    except (yaml.YAMLError, ValueError) as exc:
        raise CheckpointError(f"bad args.yaml or adapter_config.json in {run_dir}: {exc}") from exc
    _require(isinstance(args, dict) and isinstance(peft, dict), "args.yaml / adapter_config.json are not mappings")
    raw = load_checkpoint(run_dir / "hypermod.pt", records=(), enums=())
    _require(isinstance(raw, dict), "hypermod.pt is not a state dict")
    state = _tensors(raw, str(run_dir / "hypermod.pt"))

    _require(str(peft.get("peft_type", "")).upper() == "LORA", "a non-LoRA output space")
    _require(args.get("encoder_type", "linear") == "linear", f"task encoder {args.get('encoder_type')!r}")
    _require(not args.get("use_one_hot_task_emb"), "one-hot task embeddings (needs the training task list)")
    emb_model = args.get("emb_model") or ""
    _require(not emb_model or "gte" in emb_model, f"description encoder {emb_model!r} (only gte or the base model)")
    targets = list(peft.get("target_modules") or [])
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    scaling = alpha / rank * (math.sqrt(rank) if peft.get("use_rslora") else 1.0)
    shapes = {}
    for m in targets:
        a, b = state.get(f"AB_offset.A.{m}"), state.get(f"AB_offset.B.{m}")
        _require(a is not None and b is not None, f"no AB_offset for {m}")
        shapes[m] = (int(a.shape[-1]), int(b.shape[-2]))
    layers = int(state["layer_depth_encoder.0.weight"].shape[0])
    latent = int(args.get("hypernet_latent_size", 128))
    order = list(module_order) if module_order else sorted(targets)
    recorded = str(args.get("model_dir") or peft.get("base_model_name_or_path") or "").rstrip("/")
    _require(bool(recorded), "no base model name (model_dir)")
    fp = _fingerprint(recorded, base_config)
    _same_family(recorded, fp)
    hidden = int(fp.split(":H")[1].split(":")[0])
    _check_fingerprint(fp, layers, hidden, shapes)
    some_head = state.get(f"heads.{targets[0]}.weight")
    _require(some_head is not None, "no heads")
    config = SakanaT2LConfig(
        base_model=base_model or recorded,
        base_fingerprint=fp,
        num_layers=layers,
        hidden_size=hidden,
        module_shapes=shapes,
        lora=LoraSpec(target_modules=tuple(sorted(targets)), rank=rank, alpha=scaling * rank),
        latent_dim=latent,
        module_order=tuple(order),
        task_emb_size=int(state["task_encoder.mlp.0.weight"].shape[1]),
        head_in_size=int(some_head.shape[1]),
        shared_AB_head=bool(args.get("shared_AB_head")),
        autoreg_gen=bool(args.get("autoreg_gen")),
        learnable_pos_emb=bool(args.get("learnable_pos_emb")),
        head_use_bias=f"heads.{targets[0]}.bias" in state,
        training_task=args.get("training_task", "sft"),
        pred_z_score=bool(args.get("pred_z_score")),
        factorized=bool(args.get("factorized")),
        delta_w_scaling=float(args.get("delta_w_scaling", 10000)),
        emb_model=emb_model,
        emb_pooling="cls" if emb_model else "last_token",
        source=str(run_dir),
    )
    if config.training_task == "recon" and not config.factorized and config.pred_z_score:
        raise CheckpointError("their code does not support pred_z_score without factorized outputs either")
    net = SakanaTextToLoRA(config)
    _load_strict(net, state, str(run_dir / "hypermod.pt"))
    return net.eval().requires_grad_(False)


def import_t2l(run_dir: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> Path:
    net = convert_t2l(run_dir, **kwargs)
    return checkpoint.save(net, out, dtype=torch.float32, extra={"converted_from": "sakana-t2l"})


def parse_module_order(text: str | None) -> list[str] | None:
    if not text:
        return None
    order = [m.strip() for m in text.split(",") if m.strip()]
    if len(set(order)) != len(order):
        raise InvalidInputError(f"--module-order lists a module twice: {text!r}")
    return order


def main(argv: list[str]) -> int:
    """``hyperlora import {sakana-d2l,sakana-t2l} SRC OUT [options]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="hyperlora import",
        description="Convert a Sakana AI Doc-to-LoRA checkpoint (pytorch_model.bin, read without running "
        "pickled code) or Text-to-LoRA run directory (hypermod.pt, args.yaml, adapter_config.json) to our format.",
    )
    p.add_argument("which", choices=["sakana-d2l", "sakana-t2l"])
    p.add_argument("src", help="D2L: pytorch_model.bin or its checkpoint folder; T2L: the trained_t2l/<name> folder")
    p.add_argument("out", help="output directory (config.json + model.safetensors)")
    p.add_argument(
        "--base-config",
        default=None,
        help="local folder of the base model (its config.json); "
        "needed unless the checkpoint names a base model Sakana released for",
    )
    p.add_argument("--base-model", default=None, help="record this base model name instead of the checkpoint's")
    p.add_argument(
        "--chunk-len", type=int, default=None, help="D2L: split documents over this many tokens (default 8192)"
    )
    p.add_argument(
        "--module-order",
        default=None,
        help="T2L: target modules in the order of their layer-type "
        "embedding, e.g. q_proj,v_proj (default: sorted; their code used Python's set order)",
    )
    args = p.parse_args(argv)
    try:
        if args.which == "sakana-d2l":
            path = import_d2l(
                args.src, args.out, base_config=args.base_config, base_model=args.base_model, chunk_len=args.chunk_len
            )
        else:
            path = import_t2l(
                args.src,
                args.out,
                base_config=args.base_config,
                base_model=args.base_model,
                module_order=parse_module_order(args.module_order),
            )
    except (CheckpointError, InvalidInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
