"""Regenerate tests/fixtures/sakana/ with Sakana's own reference code (run in a throwaway venv).

    python3.11 -m venv /tmp/sakana-env
    /tmp/sakana-env/bin/pip install torch==2.13.0 transformers==4.51.3 peft==0.15.2 einops==0.8.1 \
        jaxtyping==0.3.2 accelerate==1.6.0 pyyaml safetensors
    /tmp/sakana-env/bin/pip install --no-deps --target /tmp/sakana-t2l-tf transformers==4.46.2 tokenizers==0.20.3
    git -C <doc-to-lora clone> archive HEAD | tar -x -C /tmp/d2l-src      # SakanaAI/doc-to-lora
    git -C <text-to-lora clone> archive HEAD | tar -x -C /tmp/t2l-src     # SakanaAI/text-to-lora
    PYTHONHASHSEED=0 /tmp/sakana-env/bin/python research/sakana_fixtures/make_fixtures.py d2l \
        --src /tmp/d2l-src --out tests/fixtures/sakana
    PYTHONHASHSEED=0 PYTHONPATH=/tmp/sakana-t2l-tf /tmp/sakana-env/bin/python \
        research/sakana_fixtures/make_fixtures.py t2l --src /tmp/t2l-src --out tests/fixtures/sakana

For every family it writes a tiny random base model (``<family>/<model-name>/``), a checkpoint in
Sakana's exact release format made and re-loaded by their code, and ``expected_*.safetensors``:
the LoRA tensors their code generates for fixed inputs. Patches to their code: none to its files;
at run time (see ``shims.py`` and ``_patch_*``) flash-attn kernels are plain-torch, base models
load on CPU in float32 with eager attention instead of CUDA/bf16/flash-attn, and (D2L,
multi-chunk only) ``CTX_AFFIXES`` gets the tiny tokenizers' ids of the strings their real ids spell.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

D2L_FAMILIES = {  # family: (released base model name, target modules)
    "gemma2": ("google/gemma-2-2b-it", ["down_proj"]),
    "qwen3": ("Qwen/Qwen3-4B-Instruct-2507", ["down_proj", "up_proj"]),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.2", ["down_proj"]),
}
T2L_FAMILIES = {  # family: (base model name, released dir name, variants)
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.2", "mistral_7b_t2l", ["L"]),
    "llama": ("meta-llama/Llama-3.1-8B-Instruct", "llama_8b_t2l", ["L"]),
    "gemma2": ("google/gemma-2-2b-it", "gemma_2b_t2l", ["L", "M", "S-pos", "S-rope"]),
}
# the strings their hard-coded CTX_AFFIXES ids spell (ctx_to_lora/data/definitions.py comments)
AFFIX_TEXT = {
    "google/gemma-2-2b-it": ("<bos><start_of_turn>user\n\n\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("<s> [INST] \n\n", " [/INST]"),
    "Qwen/Qwen3-4B-Instruct-2507": (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
}
DOCUMENT = (
    "Sakana AI is a research lab in Tokyo. It studies nature-inspired methods for foundation models, "
    "such as evolutionary model merging. The lab was founded in 2023."
)
DESCRIPTION = "Solve the math problem step by step and give the final answer"


def randomize(module, seed: int) -> None:
    """Random, compressible values for every parameter: multiples of 1/4 times a power of two.

    A fresh D2L/T2L has zero B scalers or heads (its output delta is zero); fixtures need every
    path non-trivial. Coarse values keep the gzipped checkpoints small; maths stays float32.
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            q = torch.round(torch.randn(p.shape, generator=gen) * 4) / 4
            if name.endswith("weight") and p.dim() == 1 or "norm" in name and p.dim() == 1:
                p.copy_(1 + q / 4)
            else:
                fan_in = min(p.shape[-2:]) if p.dim() >= 2 else p.shape[-1]
                scale = 2.0 ** round(math.log2(1 / math.sqrt(max(fan_in, 1))))
                p.copy_(q * scale)


def _save_expected(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"meta": json.dumps(meta)})


# --------------------------------------------------------------------------- Doc-to-LoRA
def _patch_d2l(src: Path, work: Path) -> None:
    import shims

    shims.install(work / "_shims")
    sys.path.insert(0, str(src / "src"))
    import torch
    from ctx_to_lora import model_loading
    from ctx_to_lora.modeling import hypernet

    original = model_loading.get_model

    def get_model_cpu(*args, **kwargs):  # their default: CUDA, bf16, flash-attn (4-bit if asked)
        kwargs.update(device="cpu", dtype=torch.float32, use_flash_attn=False, use_q_lora=False)
        return original(*args, **kwargs)

    model_loading.get_model = get_model_cpu
    hypernet.get_model = get_model_cpu


def make_d2l(src: Path, out: Path, families: list[str]) -> None:
    import tiny_models

    work = Path(tempfile.mkdtemp(prefix="sakana-d2l-"))
    _patch_d2l(src, work)
    import torch
    from ctx_to_lora.configs import AggregatorArguments, CtxEncoderArguments, HypernetArguments
    from ctx_to_lora.data import definitions, processing
    from ctx_to_lora.model_loading import get_lora_config, get_model, get_tokenizer
    from ctx_to_lora.modeling.hypernet import ModulatedPretrainedModel, get_hypernet_config
    from ctx_to_lora.modeling.lora_merger import combine_lora

    torch.set_num_threads(1)
    os.chdir(work)  # their tokenizer loader reads chat_templates/<name>.jinja from the cwd
    shutil.copytree(src / "chat_templates", work / "chat_templates")
    for seed, family in enumerate(families):
        name, targets = D2L_FAMILIES[family]
        tiny_models.make_base(family, work / name)
        tokenizer = get_tokenizer(name)
        prefix, suffix = AFFIX_TEXT[name]
        definitions.CTX_AFFIXES[name] = {
            "prefix": tokenizer(prefix, add_special_tokens=False).input_ids,
            "suffix": tokenizer(suffix, add_special_tokens=False).input_ids,
        }
        processing.CTX_AFFIXES[name] = definitions.CTX_AFFIXES[name]

        lora_config = get_lora_config(name, lora_r=4, target_modules=targets, lora_dropout=0.0)
        base = get_model(name, train=False, requires_grad=False, peft_config=lora_config)
        hyper_args = HypernetArguments(latent_size=32, per_rank_gen=True, per_layer_processing=True)
        agg_args = AggregatorArguments(n_latent_queries=8, num_blocks=2, num_self_attn_per_block=int(family == "qwen3"))
        ctx_args = CtxEncoderArguments(ctx_encoder_type="per_layer_activations", quantize_ctx_encoder=False)
        hcfg = get_hypernet_config(base, base.config, hyper_args, agg_args, ctx_args)
        model = ModulatedPretrainedModel(base, hcfg, ctx_args, use_sequence_packing=False)
        randomize(model.hypernet, seed=100 + seed)
        ckpt_dir = out / family / "d2l" / "checkpoint-1"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        raw = work / "pytorch_model.bin"
        torch.save(model.state_dict(), raw)  # what their Trainer writes (save_safetensors=False)
        with open(raw, "rb") as fin, gzip.GzipFile(ckpt_dir / "pytorch_model.bin.gz", "wb", mtime=0) as fout:
            shutil.copyfileobj(fin, fout)

        # reload exactly as their README does, then generate
        state = torch.load(raw, weights_only=False)
        model = ModulatedPretrainedModel.from_state_dict(state, train=False, use_sequence_packing=False)
        model.eval()
        tok = get_tokenizer(model.base_model.name_or_path)
        ids = processing.tokenize_ctx_text(dict(context=[DOCUMENT]), tok)["ctx_ids"][0]
        bias = model.hypernet.get_head_bias()
        tensors, meta = {"single.ids": torch.tensor(ids)}, {"family": family, "base_model": name}
        with torch.no_grad():
            x = torch.tensor([ids])
            loras, _ = model.generate_weights(x, torch.ones_like(x))
            combined = combine_lora(loras, torch.tensor([1]), lora_bias=bias)
            for m, ab in combined.items():
                tensors[f"single.A.{m}"], tensors[f"single.B.{m}"] = ab["A"][0], ab["B"][0]
            chunk_len = 40
            split = processing.split_too_long_ctx(
                {"ctx_ids": ids},
                name,
                None,
                max_chunk_len=chunk_len,
                min_chunk_len=None,
                max_num_split=None,
                is_train=False,
            )
            chunks = split["ctx_ids"]
            width = max(len(c) for c in chunks)
            padded = torch.tensor([c + [0] * (width - len(c)) for c in chunks])
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunks])
            loras, _ = model.generate_weights(padded, mask)
            combined = combine_lora(loras, torch.tensor([len(chunks)]), lora_bias=bias, bias_scaler=0.5)
            for m, ab in combined.items():
                tensors[f"chunked.A.{m}"], tensors[f"chunked.B.{m}"] = ab["A"][0], ab["B"][0]
            for i, c in enumerate(chunks):
                tensors[f"chunked.ids.{i}"] = torch.tensor(c)
        meta.update(document=DOCUMENT, chunk_len=chunk_len, n_chunks=len(chunks), bias_scaler=0.5)
        _save_expected(out / family / "expected_d2l.safetensors", tensors, meta)
        _copy_base(work / name, out / family / name.split("/")[-1])
        print(f"d2l {family}: {len(ids)} ids, {len(chunks)} chunks, modules {sorted(combined)}")


def _copy_base(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


# --------------------------------------------------------------------------- Text-to-LoRA
T2L_VARIANTS = {  # name: (shared_AB_head, autoreg_gen, learnable_pos_emb)
    "L": (False, False, False),
    "M": (True, False, False),
    "S-pos": (True, True, True),
    "S-rope": (True, True, False),
}


def _patch_t2l(src: Path) -> None:
    import types

    import peft  # noqa: F401  (before the stand-ins below: transformers probes for wandb)
    import transformers.generation.utils  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    # imported at module level by hyper_llm_modulator.utils for training/evaluation only
    # (experiment logging, metrics); empty stand-ins so the package imports without them
    for name in ("wandb", "inflect", "torchmetrics", "torchmetrics.text", "torchmetrics.text.rouge"):
        stub = types.ModuleType(name)
        stub.ROUGEScore = object
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(src / "src"))
    import torch
    from hyper_llm_modulator import hyper_modulator
    from hyper_llm_modulator.utils import model_loading

    original = model_loading.get_model

    def get_model_cpu(*args, **kwargs):  # their default: CUDA, bf16, flash-attn
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.arguments.update(device="cpu", dtype=torch.float32, use_flash_attn=False)
        return original(*bound.args, **bound.kwargs)

    model_loading.get_model = get_model_cpu

    def get_model_and_tokenizer_cpu(model_path, train, requires_grad, peft_config=None, model_kwargs=None, **kw):
        model = get_model_cpu(model_path, train, requires_grad, peft_config=peft_config, model_kwargs=model_kwargs)
        return model, model_loading.get_tokenizer(model_path, None, peft_config, train)

    hyper_modulator.get_model_and_tokenizer = get_model_and_tokenizer_cpu


def make_t2l(src: Path, out: Path, families: list[str]) -> None:
    import tiny_models

    work = Path(tempfile.mkdtemp(prefix="sakana-t2l-"))
    _patch_t2l(src)
    import torch
    import yaml
    from hyper_llm_modulator.hyper_modulator import create_hypermod, load_hypermod_checkpoint
    from hyper_llm_modulator.utils import embed_texts
    from hyper_llm_modulator.utils.model_loading import get_model_and_tokenizer, get_peft_config
    from hyper_llm_modulator.utils.pooling import cls_pool
    from hyper_llm_modulator.utils.utils import _embed_tokens_single_batch

    torch.set_num_threads(1)
    os.chdir(work)
    shutil.copytree(src / "chat_templates", work / "chat_templates")
    for seed, family in enumerate(families):
        name, dirname, variants = T2L_FAMILIES[family]
        committed = out / family / name.split("/")[-1]
        if committed.exists():  # the Doc-to-LoRA run made it: both must test one base model
            shutil.copytree(committed, work / name)
        else:
            tiny_models.make_base(family, work / name)
        tensors, meta = {}, {"family": family, "base_model": name, "description": DESCRIPTION, "variants": {}}
        for v_i, variant in enumerate(variants):
            shared, autoreg, pos = T2L_VARIANTS[variant]
            peft_config = get_peft_config(name, "lora", target_modules=["q_proj", "v_proj"], r=4)
            model, _tok = get_model_and_tokenizer(name, train=False, requires_grad=False, peft_config=peft_config)
            args = dict(
                model_dir=name,
                emb_model="",
                training_task="sft",
                target_modules=["q_proj", "v_proj"],
                mt_lora_path=None,
                pred_z_score=False,
                use_one_hot_task_emb=False,
                train_ds_names=["t"],
                shared_AB_head=shared,
                autoreg_gen=autoreg,
                learnable_pos_emb=pos,
                learnable_AB_offset=False,
                hypernet_latent_size=32,
                head_in_size=48,
                factorized=False,
                delta_w_scaling=10000,
                encoder_type="linear",
                exp_setup="hyper_lora",
            )
            ns = argparse.Namespace(**args)
            layer_indices = torch.arange(model.config.num_hidden_layers)
            hypermod = create_hypermod(ns, "lora", "cpu", model, layer_indices, model.config.hidden_size)
            randomize(hypermod, seed=200 + 10 * seed + v_i)
            run_dir = out / family / "t2l" / (dirname if variant == "L" else f"{dirname}_{variant}")
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save(hypermod.state_dict(), run_dir / "hypermod.pt")
            (run_dir / "args.yaml").write_text(yaml.safe_dump(args))
            peft_config.save_pretrained(str(run_dir))
            order = list(hypermod.target_modules)  # a set: its order follows this process's string hashes

            # reload exactly as their scripts/generate_lora.py does, then generate
            loaded = load_hypermod_checkpoint(str(run_dir / "hypermod.pt"), "cpu")
            with (
                open(run_dir / "hypermod.pt", "rb") as fin,
                gzip.GzipFile(run_dir / "hypermod.pt.gz", "wb", mtime=0) as fout,
            ):
                shutil.copyfileobj(fin, fout)  # stored gzipped (the tests unpack it)
            (run_dir / "hypermod.pt").unlink()
            _args, hm, base, _tok, emb_model, emb_tok, fmt, pool = loaded
            with torch.no_grad():
                task_emb = embed_texts([DESCRIPTION], emb_model, emb_tok, fmt, pool, "cpu")
                enc = hm.task_encoder(task_emb)["encoded_task_emb"]
                sd = hm.gen_lora(layer_indices, enc)
                for k, t in sd.items():
                    tensors[f"{variant}.text.{k}"] = t
                tensors[f"{variant}.text.task_emb"] = task_emb[0]
                # a sentence-encoder path (gte: CLS pooling), from a fixed hidden state
                gen = torch.Generator().manual_seed(7)
                hidden = torch.randn(1, 5, model.config.hidden_size, generator=gen)
                cls_emb = _embed_tokens_single_batch(
                    {"attention_mask": torch.ones(1, 5, dtype=torch.long)},
                    lambda _h=hidden, **kw: {"last_hidden_state": _h},
                    cls_pool,
                )
                sd = hm.gen_lora(layer_indices, hm.task_encoder(cls_emb)["encoded_task_emb"])
                for k, t in sd.items():
                    tensors[f"{variant}.cls.{k}"] = t
                tensors[f"{variant}.cls.hidden"] = hidden[0]
            meta["variants"][variant] = {"dir": str(run_dir.relative_to(out / family)), "module_order": order}
            print(f"t2l {family} {variant}: order {order}, {len(sd)} tensors")
        _save_expected(out / family / "expected_t2l.safetensors", tensors, meta)
        target = out / family / name.split("/")[-1]
        if not target.exists():
            _copy_base(work / name, target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["d2l", "t2l"])
    p.add_argument("--src", type=Path, required=True, help="a checkout of their repository")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/sakana"))
    p.add_argument("--families", nargs="*", default=None)
    args = p.parse_args()
    out = args.out.resolve()
    if args.which == "d2l":
        make_d2l(args.src.resolve(), out, args.families or list(D2L_FAMILIES))
    else:
        make_t2l(args.src.resolve(), out, args.families or list(T2L_FAMILIES))


if __name__ == "__main__":
    main()
