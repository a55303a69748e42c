"""Resumable training state in safetensors: hypernet weights, AdamW moments and a JSON header.

No pickle anywhere, so a run directory can be shared and reopened safely.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_state(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, info: dict) -> None:
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"opt.{name}.{key}"] = st[key].contiguous()
            tensors[f"opt.{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)


def load_state(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    tensors = load_file(str(path))
    saved = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(saved, strict=False)
    if unexpected or any(k in dict(net.named_parameters()) for k in missing):
        raise ValueError(f"training state does not fit the network: missing={missing} unexpected={unexpected}")
    for name, p in net.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"opt.{name}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p.device),
            }
    return info
