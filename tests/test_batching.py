"""Continuous batching: concurrent requests share decoding steps, each row with its own adapters,
sampling arguments, stop sequences and cache, and each gets the tokens it gets alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import make_tiny_model, wait_idle

from hyperlora_integrations.batching import AdapterScope, SlotTable
from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.lora import Adapter, AdapterMetadata
from hyperlora_integrations.lora.layer import active_weights

PROMPTS = ["Tell me about the town.", "What happened in 2031? Tell me more, in detail please."]


@pytest.fixture(scope="module")
def model():
    m = make_tiny_model()
    yield m
    m.disable_batching()


def adapter(model, seed: int, rank: int = 4, modules=("down_proj",), scale: float = 0.8) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for name in modules:
        d_in, d_out = model.injector.shapes[name]
        A[name] = torch.randn(model.injector.num_layers, rank, d_in, generator=g) * scale
        B[name] = torch.randn(model.injector.num_layers, d_out, rank, generator=g) * scale
    meta = AdapterMetadata(id=f"b{seed}", base_model=model.name, base_fingerprint=model.fingerprint)
    return Adapter(A, B, metadata=meta)


@pytest.fixture(scope="module")
def requests(model):
    """16 requests: different prompts, lengths, ranks, modules, and one without adapters."""
    out = []
    for i in range(16):
        modules = ("down_proj", "q_proj") if i % 3 == 0 else ("down_proj",)
        adapters = [] if i % 5 == 0 else [adapter(model, i, rank=1 + i % 6, modules=modules)]
        out.append((PROMPTS[i % 2], adapters, {"max_new_tokens": 4 + i % 9}))
    return out


def solo(model, requests):
    model.disable_batching()
    return [model.complete(p, a, **kw) for p, a, kw in requests]


def in_threads(model, requests, stagger: float = 0.0):
    results = [None] * len(requests)

    def worker(i):
        time.sleep(stagger * i)
        p, a, kw = requests[i]
        results[i] = model.complete(p, a, **kw)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batched_rows_decode_exactly_as_alone(model, requests):
    alone = solo(model, requests)
    assert len({c.token_ids for c in alone}) >= 12  # adapters change the outputs: a mix-up would show
    batcher = model.enable_batching(max_batch_size=32)
    together = in_threads(model, requests)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in together] == [
        (c.text, c.finish_reason, c.completion_tokens) for c in alone
    ]
    assert batcher.stats["max_rows"] > 1 and batcher.stats["steps"] < sum(c.completion_tokens for c in alone)
    wait_idle(batcher)
    assert batcher.active_rows == 0 and len(batcher._slots) == 0  # every row and slot released


def test_rows_join_and_leave_between_steps(model, requests):
    alone = solo(model, requests)
    batcher = model.enable_batching(max_batch_size=4)  # fewer rows than requests: they must queue
    together = in_threads(model, requests, stagger=0.01)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert batcher.stats["max_rows"] <= 4 and batcher.stats["prefills"] == len(requests)


def test_rows_sharing_an_adapter_share_its_slot(model):
    shared = adapter(model, 99)
    reqs = [(PROMPTS[i % 2], [shared], {"max_new_tokens": 6}) for i in range(6)]
    alone = solo(model, reqs)
    batcher = model.enable_batching()
    slots_seen = []
    original = batcher._step

    def step():
        slots_seen.append(len(batcher._slots))
        original()

    batcher._step = step
    together = in_threads(model, reqs)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert slots_seen and max(slots_seen) == 1


def test_per_row_sampling_stops_and_processors(model):
    reqs = [
        (PROMPTS[0], [adapter(model, 1)], {"max_new_tokens": 8, "do_sample": True, "seed": 5, "top_k": 20}),
        (PROMPTS[1], [], {"max_new_tokens": 8, "repetition_penalty": 2.0}),
        (PROMPTS[0], [adapter(model, 2)], {"max_new_tokens": 8, "stop": ["\n\n"]}),
        (PROMPTS[1], [adapter(model, 3)], {"max_new_tokens": 8, "min_new_tokens": 3, "sequence_bias": [[[2], 50.0]]}),
        (PROMPTS[0], [], {"max_new_tokens": 8, "eos_token_id": 198}),
    ]
    alone = solo(model, reqs)
    model.enable_batching()
    together = in_threads(model, reqs)
    assert [(c.token_ids, c.text, c.finish_reason) for c in together] == [
        (c.token_ids, c.text, c.finish_reason) for c in alone
    ]
    assert alone[3].completion_tokens == 3 and alone[4].completion_tokens == 0


def test_streams_and_cancellation_free_the_row(model):
    batcher = model.enable_batching()
    a = adapter(model, 7)
    stream = model.stream_chunks(PROMPTS[0], [a], max_new_tokens=500)
    first = next(stream)
    assert first.text or first.finish_reason is None
    deadline = time.time() + 10
    while batcher.active_rows != 1 and time.time() < deadline:
        time.sleep(0.01)
    assert batcher.active_rows == 1 and len(batcher._slots) == 1
    stream.close()  # the consumer walks away: the row must go at the next step
    while batcher.active_rows and time.time() < deadline:
        time.sleep(0.01)
    wait_idle(batcher)
    assert batcher.active_rows == 0 and len(batcher._slots) == 0
    assert batcher.stats["cancelled"] == 1
    assert batcher.stats["row_steps"] < 100  # it did not decode its 500 tokens
    assert model.complete(PROMPTS[1], [a], max_new_tokens=3).completion_tokens == 3  # still serving


def test_interleaved_streams_in_one_thread(model, requests):
    alone = solo(model, requests)
    model.enable_batching()
    streams = [model.stream_chunks(p, a, **kw) for p, a, kw in requests]
    last = [None] * len(streams)
    live = set(range(len(streams)))
    while live:
        for i in sorted(live):
            try:
                last[i] = next(streams[i])
                assert active_weights() is None  # the batch's adapters never reach the caller
            except StopIteration:
                live.discard(i)
    assert [c.token_ids for c in last] == [c.token_ids for c in alone]


async def test_asyncio_tasks_batch_without_threads(model, requests):
    alone = solo(model, requests)
    batcher = model.enable_batching()

    async def one(p, a, kw):
        chunks = [c async for c in model.astream_chunks(p, a, **kw)]
        return "".join(c.text for c in chunks), chunks[-1].token_ids

    results = await asyncio.gather(*(one(p, a, kw) for p, a, kw in requests))
    assert [r[1] for r in results] == [c.token_ids for c in alone]
    assert [r[0] for r in results] == [c.text for c in alone]
    assert batcher.stats["max_rows"] > 1


async def test_asyncio_without_batching_matches(model, requests):
    alone = solo(model, requests[:3])
    out = []
    for p, a, kw in requests[:3]:
        out.append([c async for c in model.astream_chunks(p, a, **kw)][-1].token_ids)
    assert out == [c.token_ids for c in alone]


class Boom(torch.nn.Module):
    def forward(self, input_ids, scores):  # a LogitsProcessor-shaped callable that fails
        raise RuntimeError("processor failed")


def test_a_failing_row_does_not_take_the_batch_down(model):
    model.enable_batching()
    good = [(PROMPTS[i % 2], [adapter(model, 40 + i)], {"max_new_tokens": 5}) for i in range(4)]
    expected = [c.token_ids for c in solo(model, good)]
    model.enable_batching()
    errors = []

    def bad():
        try:
            model.complete(PROMPTS[0], max_new_tokens=5, logits_processor=[Boom()])
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=bad)
    t.start()
    together = in_threads(model, good)
    t.join()
    assert errors == ["processor failed"]
    assert [c.token_ids for c in together] == expected


def test_slot_table_gathers_each_rows_own_delta(model):
    """Logits of a 3-row batch through the slot table equal each row's own adapters applied alone."""
    adapters = [[adapter(model, 1, rank=2)], [], [adapter(model, 2, rank=5, modules=("q_proj", "down_proj"))]]
    scopes = [AdapterScope(model.injector, a) for a in adapters]
    table = SlotTable(model.injector.num_layers, torch.float32, torch.device("cpu"))
    slots = [table.acquire(s) for s in scopes]
    ids = torch.tensor([model.encode(PROMPTS[0])] * 3)
    with torch.no_grad(), model.injector.activate_weights(table.A, table.B, torch.tensor(slots)):
        batched = model.model(input_ids=ids).logits
    for i, scope in enumerate(scopes):
        with torch.no_grad(), scope():
            alone = model.model(input_ids=ids[i : i + 1]).logits[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
    assert table.acquire(scopes[0]) == slots[0]  # same adapters, same slot
    table.release(scopes[0].key)
    table.release(scopes[0].key)
    assert len(table) == 2


def test_bad_batch_size_is_refused(model):
    with pytest.raises(InvalidInputError):
        model.enable_batching(max_batch_size=0)


class Gaps(torch.nn.Module):
    """Records the gap between the two best logits at each step (changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []

    def forward(self, input_ids, scores):
        top = scores[0].topk(2).values
        self.gaps.append(float(top[0] - top[1]))
        return scores


@pytest.mark.slow
def test_real_model_batched_greedy_equals_serial():
    """The default model with 8 real document adapters: batched greedy decoding gives the serial
    token ids; a request may differ only where its serial path had a near-tie (gap < 1e-3), and
    the count of such flips is printed (the serving benchmark reports it at 1-32 requests)."""
    from hyperlora_integrations.bench.serve import documents
    from hyperlora_integrations.model import HyperLoRAModel

    model = HyperLoRAModel.from_pretrained()
    pairs = documents(8)
    adapters = [model.internalize(doc) for doc, _ in pairs]
    gaps = [Gaps() for _ in pairs]
    serial = [
        model.complete(q, [a], max_new_tokens=16, logits_processor=[g]).token_ids
        for (_, q), a, g in zip(pairs, adapters, gaps)
    ]
    model.enable_batching()
    try:
        reqs = [(q, [a], {"max_new_tokens": 16}) for (_, q), a in zip(pairs, adapters)]
        batched = [c.token_ids for c in in_threads(model, reqs)]
    finally:
        model.disable_batching()
    flips = 0
    for s, b, g in zip(serial, batched, gaps):
        if s != b:
            first = next(i for i, (x, y) in enumerate(zip(s, b)) if x != y)
            assert g.gaps[first] < 1e-3, f"differs at token {first} where the serial gap was {g.gaps[first]:.2e}"
            flips += 1
    print(f"{flips} of {len(serial)} requests flipped at a near-tie")
    assert flips <= 1
