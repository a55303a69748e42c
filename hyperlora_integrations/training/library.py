"""The library of per-task fitted adapters that ``train t2l --reconstruct`` regresses onto.

Reconstruction training reads a folder of adapters, one per task, each fitted by gradient
descent with the SFT loss (``research/fit_library.py`` writes it; docs/text-to-lora.md). This
module holds what the supported training path needs from that library:

- its on-disk format: ``save_fit`` / ``load_library`` (``<task>.safetensors`` + ``<task>.json``);
- ``FittedAdapter``: free A/B parameters shaped like one hypernetwork output, which a training
  loss accepts in place of the hypernetwork (a fit optimises it; ``holding`` serves a fixed one);
- the input second moments of the activation-weighted distance (``--weighted``):
  ``input_gram``, ``library_gram`` (cached per task set) and ``gram_root``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lora import Adapter
from ..model import HyperLoRAModel
from .tasks import Example, Task


class FittedAdapter(nn.Module):
    """Free A/B parameters shaped like one hypernetwork output: a loss treats it as the net."""

    def __init__(self, like: Adapter) -> None:
        super().__init__()
        # peft's LoRA initialisation: A small and random, B zero, so the fit starts at the base model.
        self.A = nn.ParameterDict(
            {m: nn.Parameter(torch.randn_like(a) * a.shape[-1] ** -0.5) for m, a in like.A.items()}
        )
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros_like(b)) for m, b in like.B.items()})

    @classmethod
    def holding(cls, adapter: Adapter) -> FittedAdapter:
        """One that serves ``adapter`` itself (scaling folded into B): a fixed adapter where a
        loss expects a network."""
        fit = cls(adapter)
        with torch.no_grad():
            for m in adapter.A:
                fit.A[m].copy_(adapter.A[m])
                fit.B[m].copy_(adapter.B[m] * adapter.scaling)
        return fit

    def forward(self, inputs: torch.Tensor):
        """The same adapter for each row of ``inputs`` (document activations or task embeddings)."""
        n = inputs.shape[0]
        return {m: a.expand(n, *a.shape) for m, a in self.A.items()}, {
            m: b.expand(n, *b.shape) for m, b in self.B.items()
        }

    def adapter(self) -> Adapter:
        return Adapter(
            {m: a.detach().clone() for m, a in self.A.items()}, {m: b.detach().clone() for m, b in self.B.items()}
        )


def file_name(task_name: str, suffix: str = ".safetensors") -> str:
    return task_name.replace("/", "__") + suffix


def save_fit(folder: Path, task: Task, split_name: str, adapter: Adapter, info: dict) -> None:
    """The adapter, then its record: a task counts as fitted once its ``.json`` exists."""
    adapter.metadata.kind = "skill"
    adapter.metadata.description = task.descriptions[0]
    adapter.save(Path(folder) / file_name(task.name))
    record = {
        "task": task.name,
        "split": split_name,
        "kind": task.kind,
        # Self-describing: a training run can take the entry as a task without the data it came from.
        "descriptions": task.descriptions,
        "examples": [[ex.input, ex.target] for ex in task.examples[:8]],
        **info,
    }
    (Path(folder) / file_name(task.name, ".json")).write_text(json.dumps(record))


def load_library(folder: str | Path, split_name: str = "train") -> dict[str, tuple[Adapter, dict]]:
    """Fitted adapters of one split by task name, each with its fit record."""
    out = {}
    for info_path in sorted(Path(folder).glob("*.json")):
        info = json.loads(info_path.read_text())
        if info.get("split") == split_name:
            out[info["task"]] = (Adapter.load(info_path.with_suffix(".safetensors")), info)
    return out


def described_tasks(fitted: dict[str, tuple[Adapter, dict]], known: set[str]) -> list[Task]:
    """Library entries that are not among ``known`` tasks, as tasks of their own, from the
    description and examples their records carry (``research/consolidated_library.py`` writes
    one per family paraphrase)."""
    return [
        Task(name, info.get("kind", "gen"), info["descriptions"], [Example(i, t) for i, t in info.get("examples", [])])
        for name, (_, info) in fitted.items()
        if name not in known and info.get("descriptions")
    ]


@torch.no_grad()
def input_gram(model: HyperLoRAModel, examples: list[Example], modules: list[str], args) -> dict[str, torch.Tensor]:
    """``E[x x']`` of each target module's input per layer, over the tokens of ``examples``
    (prompt and target, as the SFT loss sees them): ``{module: (L, d_in, d_in)}``."""
    from .train_t2l import sft_batch  # train_t2l imports this module lazily in turn

    sums: dict[tuple[str, int], torch.Tensor] = {}
    count = 0
    keep: list[torch.Tensor] = []

    def hook_for(key):
        def hook(module, inputs, output):
            x = inputs[0][keep[0]].double()
            sums[key] = sums.get(key, 0) + x.T @ x

        return hook

    handles = [
        t.module.register_forward_hook(hook_for(key)) for key, t in model.injector.targets.items() if key[0] in modules
    ]
    try:
        for i in tqdm(range(0, len(examples), 8), desc="input second moments", unit="batch"):
            ids, mask, _labels = sft_batch(model, examples[i : i + 8], args)
            keep[:] = [mask.bool()]
            model.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    layers = model.injector.num_layers
    return {m: torch.stack([sums[(m, layer)] / count for layer in range(layers)]).float() for m in modules}


def gram_root(gram: torch.Tensor, k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S (L, d_in, k), tail (L,))`` with ``gram ~= S S' + tail I`` per layer.

    The top ``k`` eigen-directions are kept exactly and the rest is treated as isotropic at their
    mean eigenvalue, so the activation-weighted distance costs two rank-``k`` products instead of
    one ``d_in x d_in`` one per adapter row. Exact when ``k == d_in``.
    """
    vals, vecs = torch.linalg.eigh(gram.double())  # ascending
    vals, vecs = vals.clamp_min(0).flip(-1), vecs.flip(-1)
    k = min(k, vals.shape[-1])
    rest = vals[..., k:]
    tail = rest.mean(-1) if rest.shape[-1] else torch.zeros_like(vals[..., 0])
    root = vecs[..., :k] * (vals[..., None, :k] - tail[..., None, None]).clamp_min(0).sqrt()
    return root.float(), tail.float()


def library_gram(folder: Path, model: HyperLoRAModel, tasks: list[Task], modules: list[str], args) -> dict:
    """The input second moments of the library's training tasks (2 examples each), cached in
    ``folder/gram-<key>.safetensors``.

    The key names the task set, the modules and the input cut, so a library that grew (or a
    run over part of it) never reads second moments of another task set. Tasks are visited in
    name order, so the same set gives the same moments whichever caller computes them first.
    """
    from safetensors.torch import load_file, save_file

    tasks = sorted(tasks, key=lambda t: t.name)
    spec = {"tasks": [t.name for t in tasks], "modules": sorted(modules), "max_input_tokens": args.max_input_tokens}
    key = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]
    path = Path(folder) / f"gram-{key}.safetensors"
    if path.exists():
        return load_file(str(path))
    rng = random.Random(0)
    examples = [ex for t in tasks for ex in rng.sample(t.examples, min(2, len(t.examples)))]
    gram = input_gram(model, examples, modules, args)
    save_file({m: g.contiguous() for m, g in gram.items()}, str(path), metadata={"spec": json.dumps(spec)})
    return gram
