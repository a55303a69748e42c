"""The functional LoRA engine: the properties every other part relies on."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel

from hyperlora_integrations import Adapter, AdapterMetadata, BaseModelMismatchError, CheckpointError, concat
from hyperlora_integrations.errors import InvalidInputError, UnsafeFileError


def random_adapter(model, rank=4, modules=("down_proj",), seed=0, scale=0.05, kind="custom"):
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name in modules:
        d_in, d_out = model.injector.shapes[name]
        A[name] = torch.randn(model.injector.num_layers, rank, d_in, generator=g) * scale
        B[name] = torch.randn(model.injector.num_layers, d_out, rank, generator=g) * scale
    meta = AdapterMetadata(kind=kind, base_model=model.name, base_fingerprint=model.fingerprint)
    return Adapter(A, B, scaling=2.0, metadata=meta)


def logits(model, ids, adapters=()):
    with torch.no_grad(), model.activate(adapters):
        return model.model(input_ids=ids).logits


@pytest.fixture()
def ids(tiny_model):
    return torch.tensor([tiny_model.encode("The quick brown fox jumps over the lazy dog.")])


def test_zero_delta_adapter_leaves_logits_unchanged(tiny_model, ids):
    adapter = random_adapter(tiny_model)
    adapter.B["down_proj"].zero_()
    assert torch.equal(logits(tiny_model, ids), logits(tiny_model, ids, [adapter]))


def test_adapter_changes_logits_only_inside_scope(tiny_model, ids):
    base = logits(tiny_model, ids)
    adapter = random_adapter(tiny_model)
    assert not torch.allclose(base, logits(tiny_model, ids, [adapter]))
    assert torch.equal(base, logits(tiny_model, ids))  # nothing leaks after the with-block


def test_rank_concat_of_several_adapters(tiny_model, ids):
    a = random_adapter(tiny_model, rank=4, seed=1)
    b = random_adapter(tiny_model, rank=2, modules=("down_proj", "q_proj"), seed=2)
    both = concat([a, b])
    assert both.A["down_proj"].shape[1] == 6 and both.A["q_proj"].shape[1] == 2
    # passing a list activates exactly the concatenation
    assert torch.allclose(logits(tiny_model, ids, [a, b]), logits(tiny_model, ids, [both]), atol=1e-6)


def test_rank_concat_is_exact_on_a_single_linear(tiny_model):
    a = random_adapter(tiny_model, rank=3, seed=3)
    b = random_adapter(tiny_model, rank=5, seed=4)
    x = torch.randn(7, tiny_model.injector.shapes["down_proj"][0])

    def delta(ad):
        A, B = ad.folded()
        return x @ A["down_proj"][0].T @ B["down_proj"][0].T

    assert torch.allclose(delta(concat([a, b])), delta(a) + delta(b), atol=1e-6)


def test_merge_unmerge_round_trip(fresh_tiny_model, ids):
    model = fresh_tiny_model
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    adapter = random_adapter(model)
    expected = logits(model, ids, [adapter])
    model.merge(adapter)
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    with pytest.raises(InvalidInputError):
        model.merge(adapter)
    model.unmerge(adapter)
    after = model.model.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_gradient_reaches_A_and_B(tiny_model, ids):
    adapter = random_adapter(tiny_model)
    A = {k: v.clone().requires_grad_(True) for k, v in adapter.A.items()}
    B = {k: (v * adapter.scaling).clone().requires_grad_(True) for k, v in adapter.B.items()}
    with tiny_model.injector.activate_weights(A, B):
        loss = tiny_model.model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert A["down_proj"].grad is not None and A["down_proj"].grad.abs().sum() > 0
    assert B["down_proj"].grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.model.parameters())


def test_two_threads_get_their_own_adapters(tiny_model, ids):
    adapters = [random_adapter(tiny_model, seed=s) for s in (10, 11)]
    expected = [logits(tiny_model, ids, [a]) for a in adapters]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(10):
            results[i].append(logits(tiny_model, ids, [adapters[i]]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert all(torch.equal(r, expected[i]) for r in results[i])


def test_peft_export_gives_same_logits(fresh_tiny_model, ids, tmp_path):
    model = fresh_tiny_model
    adapter = random_adapter(model, modules=("down_proj", "q_proj"))
    ours = logits(model, ids, [adapter])
    model.export_adapter(adapter, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(model.model, str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    peft_model.unload()


def test_peft_round_trip_and_refusals(tiny_model, tmp_path):
    adapter = random_adapter(tiny_model)
    tiny_model.export_adapter(adapter, tmp_path / "a")
    back = tiny_model.load_adapter(tmp_path / "a")
    assert back.id == adapter.id
    assert torch.allclose(back.folded()[1]["down_proj"], adapter.folded()[1]["down_proj"])
    # pickle only
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UnsafeFileError):
        tiny_model.load_adapter(tmp_path / "p")
    # other base model named in the config
    cfg = (tmp_path / "a" / "adapter_config.json").read_text().replace("tiny-random-llama", "Mistral-7B")
    (tmp_path / "a" / "adapter_config.json").write_text(cfg)
    with pytest.raises(BaseModelMismatchError):
        tiny_model.load_adapter(tmp_path / "a")


def test_single_file_round_trip_and_corruption(tiny_model, tmp_path):
    adapter = random_adapter(tiny_model)
    path = adapter.save(tmp_path / "a.safetensors")
    back = Adapter.load(path)
    assert back.metadata == adapter.metadata and back.scaling == adapter.scaling
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        Adapter.load(tmp_path / "trunc.safetensors")
    huge = (10**15).to_bytes(8, "little") + data[8:]
    (tmp_path / "huge.safetensors").write_bytes(huge)
    with pytest.raises(CheckpointError):
        Adapter.load(tmp_path / "huge.safetensors")


def test_wrong_shapes_refused(tiny_model):
    bad = Adapter({"down_proj": torch.zeros(2, 4, 999)}, {"down_proj": torch.zeros(2, 64, 4)})
    with pytest.raises(BaseModelMismatchError):
        tiny_model.generate("hi", [bad], max_new_tokens=1)
    other = random_adapter(tiny_model)
    other.metadata.base_fingerprint = "llama:L30:H576:I1536:V49152"
    with pytest.raises(BaseModelMismatchError):
        tiny_model.generate("hi", [other], max_new_tokens=1)


def test_nbytes(tiny_model):
    adapter = random_adapter(tiny_model, rank=4)
    d_in, d_out = tiny_model.injector.shapes["down_proj"]
    assert adapter.nbytes == 4 * tiny_model.injector.num_layers * 4 * (d_in + d_out)


def test_compress_is_exact_at_full_rank_and_optimal_below(tiny_model):
    from hyperlora_integrations.lora import compress, retained_energy

    a, b = random_adapter(tiny_model, rank=4, seed=5), random_adapter(tiny_model, rank=4, seed=6)
    both = concat([a, b])

    def delta(ad):
        A, B = ad.folded()
        return B["down_proj"] @ A["down_proj"]

    full = compress(both, 8)
    assert full is both
    exact = compress(both, 7)
    cut = compress(both, 2)
    assert cut.A["down_proj"].shape[1] == 2 and cut.B["down_proj"].shape[2] == 2
    err7 = (delta(exact) - delta(both)).norm()
    err2 = (delta(cut) - delta(both)).norm()
    assert err7 < err2
    # the kept energy matches the error of the truncation (Eckart-Young)
    energy = retained_energy(both, 2)
    assert abs((1 - energy) - float(err2**2 / delta(both).norm() ** 2)) < 1e-4


def test_compress_of_a_delta_of_high_rank_takes_the_dense_route_and_agrees(tiny_model):
    """A weighted sum of many adapters has more rank than the matrix has room for; its cut must
    still be the optimal one, and the same as the QR route gives where both apply."""
    from hyperlora_integrations.lora import compress, retained_energy
    from hyperlora_integrations.lora.compress import _svd

    d_in, d_out = tiny_model.injector.shapes["down_proj"]
    many = concat([random_adapter(tiny_model, rank=8, seed=s) for s in range(max(d_in, d_out) // 8 + 1)])
    A, B = many.folded()
    a, b = A["down_proj"].double(), B["down_proj"].double()
    assert a.shape[1] >= min(d_in, d_out)  # dense branch
    s_true = torch.linalg.svdvals(b @ a)
    assert torch.allclose(_svd(a, b, values_only=True), s_true)
    k = 3
    cut = compress(many, k)
    CA, CB = cut.folded()
    err = (CB["down_proj"].double() @ CA["down_proj"].double() - b @ a).norm() ** 2
    assert abs(float(err) - float(s_true[:, k:].pow(2).sum())) < 1e-6 * float(s_true.pow(2).sum())
    assert abs(retained_energy(many, k) - float(s_true[:, :k].pow(2).sum() / s_true.pow(2).sum())) < 1e-9
    # below the dense threshold the QR route gives the same singular values
    small_a, small_b = a[:, :2], b[:, :, :2]
    assert torch.allclose(
        _svd(small_a, small_b, values_only=True)[:, :2], torch.linalg.svdvals(small_b @ small_a)[:, :2]
    )
