"""Shared by the Sakana parity tests: where the fixtures are and how to read them."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures" / "sakana"
ATOL = 1e-5  # the bar for generated A/B against their code


def gunzip_checkpoint(family: str, dest: Path) -> Path:
    """Their D2L checkpoint as released, ``checkpoint-1/pytorch_model.bin`` (stored gzipped here)."""
    target = dest / "checkpoint-1" / "pytorch_model.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        gzip.open(FIXTURES / family / "d2l" / "checkpoint-1" / "pytorch_model.bin.gz") as src,
        open(target, "wb") as out,
    ):
        shutil.copyfileobj(src, out)
    return target


def expected(family: str, what: str = "d2l") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors their code generated, and what it was given (``meta``)."""
    path = FIXTURES / family / f"expected_{what}.safetensors"
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["meta"])


def t2l_run(family: str, name: str, dest: Path) -> Path:
    """Their T2L run directory as released (``hypermod.pt``, ``args.yaml``, ``adapter_config.json``)."""
    src = FIXTURES / family / name
    run = dest / Path(name).name
    run.mkdir(parents=True, exist_ok=True)
    for f in ("args.yaml", "adapter_config.json"):
        shutil.copy(src / f, run / f)
    with gzip.open(src / "hypermod.pt.gz") as fin, open(run / "hypermod.pt", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return run
