"""Text-to-LoRA reconstruction: the delta distance, the fitted-adapter library and the training mode."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hyperlora_integrations.hypernets import TextToLoRA
from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.lora import delta_sq_distance
from hyperlora_integrations.testing import tiny_hyperlora_model as make_tiny_model
from hyperlora_integrations.training.library import FittedAdapter, load_library, save_fit
from hyperlora_integrations.training.tasks import Example, Task
from hyperlora_integrations.training.train_t2l import reconstruction_loss
from research.fit_library import fit_task

TASKS = [
    Task(
        "capitals",
        "gen",
        ["Answer with the capital city.", "Give the capital."],
        [Example("France?", "Paris"), Example("Italy?", "Rome"), Example("Spain?", "Madrid")],
    ),
    Task(
        "currencies",
        "gen",
        ["Answer with the currency.", "Name the money used there."],
        [Example("Japan?", "Yen"), Example("France?", "Euro"), Example("India?", "Rupee")],
    ),
]


def test_delta_distance_is_exact_and_ignores_the_factorisation():
    torch.manual_seed(0)
    a1, b1 = torch.randn(2, 3, 4, 12), torch.randn(2, 3, 10, 4)
    a2, b2 = torch.randn(3, 6, 12), torch.randn(3, 10, 6)  # another rank, broadcast over the batch
    dist, ref = delta_sq_distance(a1, b1, a2, b2)
    assert dist.shape == ref.shape == (2, 3)
    assert torch.allclose(dist, ((b1 @ a1 - b2 @ a2) ** 2).sum((-1, -2)), rtol=1e-4)
    assert torch.allclose(ref, ((b2 @ a2) ** 2).sum((-1, -2)).expand(2, 3), rtol=1e-4)
    m = torch.randn(4, 4) + 4 * torch.eye(4)  # B A == (B M)(M^-1 A)
    same, _ = delta_sq_distance(torch.linalg.inv(m) @ a1, b1 @ m, a1, b1)
    assert float(same.max()) < 1e-3 * float(ref.max())


def _fit(model, like, task, steps: int = 30):
    return fit_task(
        model, like, task.examples, random.Random(0), steps=steps, batch=2, lr=1e-2, max_input_tokens=32, seed=0
    )


def _tasks_json(folder, tasks) -> str:
    """``--tasks-json`` for ``train t2l``: the tasks instead of the real data."""
    path = folder / "tasks.json"
    rows = [{"name": t.name, "descriptions": t.descriptions, "examples": [vars(e) for e in t.examples]} for t in tasks]
    path.write_text(json.dumps(rows))
    return str(path)


def test_fitted_library_round_trips_by_split(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    like = model.generate_skill("shape only")
    fits = {}
    for split_name, task in zip(("train", "held"), TASKS):
        adapter, losses = _fit(model, like, task)
        assert losses["last5"] < losses["first5"] - 0.3  # the fit learns the task
        save_fit(tmp_path, task, split_name, adapter, losses)
        fits[task.name] = adapter
    train = load_library(tmp_path, "train")
    assert list(train) == ["capitals"] and list(load_library(tmp_path, "held")) == ["currencies"]
    loaded, info = train["capitals"]
    assert info["kind"] == "gen" and loaded.metadata.description == "Answer with the capital city."
    assert all(torch.equal(loaded.B[m], fits["capitals"].B[m]) for m in loaded.B)


def test_reconstruction_loss_is_one_at_zero_and_zero_at_the_target():
    model = make_tiny_model(seed=2)
    net = TextToLoRA.for_model(model, latent_dim=32, embed_dim=8)  # untrained: zero delta
    target = model.generate_skill("Answer with the capital city.")
    with torch.no_grad():
        zero = float(reconstruction_loss(net, torch.randn(2, 8), [target, target]))
        exact = float(reconstruction_loss(FittedAdapter.holding(target), torch.randn(1, 8), [target]))
    assert zero == pytest.approx(1.0, abs=1e-5)
    assert exact == pytest.approx(0.0, abs=1e-4)


def test_reconstruction_training_cli_learns_the_library(tmp_path):
    """``train t2l --reconstruct``: the generated deltas approach each task's fitted one."""
    from hyperlora_integrations.training import train_t2l

    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    like = model.generate_skill("shape only")
    lib = tmp_path / "lib"
    lib.mkdir()
    for task in TASKS:
        adapter, losses = _fit(model, like, task, steps=10)
        save_fit(lib, task, "train", adapter, losses)
    tasks_json = _tasks_json(tmp_path, TASKS)
    out = tmp_path / "run"
    common = ["--tiny", "--tasks-json", tasks_json, "--reconstruct", str(lib), "--out", str(out)]
    common += ["--latent-dim", "32", "--tasks-per-step", "2", "--lr", "3e-3", "--warmup", "5", "--save-every", "50"]
    train_t2l.main([*common, "--steps", "100"])
    train_t2l.main([*common, "--steps", "150", "--weighted"])  # resumes; the error on real activations
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 151))
    assert log[0]["ce"] == pytest.approx(1.0, abs=0.05)  # starts at the zero delta
    assert sum(r["ce"] for r in log[-10:]) / 10 < 0.5
    assert ckpt.load(out / "checkpoint").config.kind == "t2l"


def test_weighted_distance_is_the_output_difference_on_real_activations():
    """``input_gram`` + ``delta_sq_distance(gram=...)`` == mean ||dW1 x - dW2 x||^2 over the
    module's real inputs (deltas only in layer 0, whose inputs no adapter changes)."""
    from hyperlora_integrations.training import train_t2l
    from hyperlora_integrations.training.library import gram_root, input_gram

    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    args = train_t2l.parse_args(["--max-input-tokens", "32"])
    examples = [e for t in TASKS for e in t.examples]
    gram = input_gram(model, examples, ["down_proj"], args)["down_proj"]
    L, d_in = gram.shape[0], gram.shape[1]
    d_out = model.injector.shapes["down_proj"][1]
    A = [torch.randn(L, 4, d_in) for _ in range(2)]
    B = [torch.randn(L, d_out, 4) for _ in range(2)]
    for b in B:
        b[1:] = 0
    outputs = []
    target = model.injector.targets[("down_proj", 0)].module
    handle = target.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    ids, mask, _ = train_t2l.sft_batch(model, examples, args)
    try:
        for a, b in zip(A, B):
            with torch.no_grad(), model.injector.activate_weights({"down_proj": a}, {"down_proj": b}):
                model.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    direct = ((outputs[0] - outputs[1])[mask.bool()] ** 2).sum(-1).mean()
    dist, _ = delta_sq_distance(A[0], B[0], A[1], B[1], gram)
    assert float(dist.sum()) == pytest.approx(float(direct), rel=1e-3)
    for k in (d_in, 8):  # exact with every direction, close with the top 8 and an isotropic tail
        root, tail = gram_root(gram, k=k)
        top, _ = delta_sq_distance(A[0] @ root, B[0], A[1] @ root, B[1])
        rest, _ = delta_sq_distance(A[0], B[0], A[1], B[1])
        approx = float((top + tail * rest).sum())
        assert approx == pytest.approx(float(direct), rel=1e-3 if k == d_in else 0.3)


def test_library_gram_is_cached_per_task_set(tmp_path):
    """A grown library must not reuse the second moments of the smaller one; the same set in
    another order must (callers list tasks in different orders)."""
    from hyperlora_integrations.training import train_t2l
    from hyperlora_integrations.training.library import library_gram

    model = make_tiny_model(seed=2)
    args = train_t2l.parse_args(["--max-input-tokens", "32"])
    one = library_gram(tmp_path, model, TASKS[:1], ["down_proj"], args)
    both = library_gram(tmp_path, model, TASKS, ["down_proj"], args)
    assert len(list(tmp_path.glob("gram-*.safetensors"))) == 2
    assert not torch.allclose(one["down_proj"], both["down_proj"])
    again = library_gram(tmp_path, model, TASKS[::-1], ["down_proj"], args)
    assert len(list(tmp_path.glob("gram-*.safetensors"))) == 2
    assert torch.equal(again["down_proj"], both["down_proj"])


def test_delta_inner_matrix_matches_pairwise_distances():
    from hyperlora_integrations.lora import delta_inner_matrix

    torch.manual_seed(0)
    a, b = torch.randn(5, 3, 4, 12), torch.randn(5, 3, 10, 4)
    g = delta_inner_matrix(a, b)
    deltas = (b @ a).double()  # (N, L, d_out, d_in)
    direct = torch.einsum("nlij,mlij->nm", deltas, deltas)
    assert torch.allclose(g, direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))
    dist, _ = delta_sq_distance(a[1], b[1], a[3], b[3])
    assert float(g[1, 1] + g[3, 3] - 2 * g[1, 3]) == pytest.approx(float(dist.sum()), rel=1e-4)


def test_library_entries_describe_themselves_and_train_as_tasks(tmp_path):
    """An entry of no known task (one per family paraphrase, research/consolidated_library) is
    trained on from its record alone; a held entry never is."""
    from hyperlora_integrations.training import train_t2l
    from hyperlora_integrations.training.library import described_tasks

    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    like = model.generate_skill("shape only")
    lib = tmp_path / "lib"
    lib.mkdir()
    paraphrase = Task("currencies#1", "gen", ["Name the money used there."], TASKS[1].examples)
    for task, split_name in ((TASKS[0], "train"), (paraphrase, "train"), (TASKS[1], "held")):
        adapter, losses = _fit(model, like, task, steps=5)
        save_fit(lib, task, split_name, adapter, losses)
    fitted = load_library(lib, "train")
    [described] = described_tasks(fitted, known={"capitals"})
    assert described.name == "currencies#1" and described.descriptions == ["Name the money used there."]
    assert [(e.input, e.target) for e in described.examples] == [(e.input, e.target) for e in TASKS[1].examples]
    tasks_json = _tasks_json(tmp_path, TASKS[:1])
    out = tmp_path / "run"
    args = ["--tiny", "--tasks-json", tasks_json, "--reconstruct", str(lib), "--out", str(out), "--weighted"]
    train_t2l.main([*args, "--latent-dim", "32", "--tasks-per-step", "2", "--steps", "3", "--warmup", "1"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(sorted(r["tasks"]) == ["capitals", "currencies#1"] for r in log)


def test_reconstruction_beside_sft_trains_both(tmp_path):
    """``--recon-weight``: each step has its SFT tasks and its reconstruction targets, and the
    reconstruction error falls."""
    from hyperlora_integrations.training import train_t2l

    torch.manual_seed(0)
    model = make_tiny_model(seed=2)
    like = model.generate_skill("shape only")
    lib = tmp_path / "lib"
    lib.mkdir()
    for d, text in enumerate(TASKS[1].descriptions):
        adapter, losses = _fit(model, like, TASKS[1], steps=10)
        save_fit(lib, Task(f"currencies#{d}", "gen", [text], TASKS[1].examples), "train", adapter, losses)
    tasks_json = _tasks_json(tmp_path, TASKS[:1])
    out = tmp_path / "run"
    args = ["--tiny", "--tasks-json", tasks_json, "--reconstruct", str(lib), "--out", str(out)]
    args += ["--recon-weight", "1", "--recon-tasks-per-step", "2", "--latent-dim", "32", "--tasks-per-step", "1"]
    train_t2l.main([*args, "--steps", "40", "--lr", "3e-3", "--warmup", "2", "--max-input-tokens", "32"])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["tasks"] == ["capitals"] and sorted(r["recon_tasks"]) == ["currencies#0", "currencies#1"] for r in log)
    assert log[0]["recon"] == pytest.approx(1.0, abs=0.05)
    assert sum(r["recon"] for r in log[-5:]) / 5 < 0.95  # 1.0 -> 0.88 in 40 steps
