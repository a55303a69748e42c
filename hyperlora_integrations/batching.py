"""Continuous batching: concurrent requests decoded together, each row with its own adapters.

Decoding a small model on a CPU is bound by reading the weights once per token; a batch of 16
rows reads them once for all 16. ``BatchScheduler`` runs one background thread that owns a batch
of rows. Requests (from any thread, or asyncio tasks) join between decoding steps and leave when
they finish or are cancelled, so a long answer never holds up a short one (continuous batching).

* **Per-row adapters.** Each distinct adapter set of the rows in flight is folded once into a
  slot of a ``SlotTable``; the LoRA hooks gather one slot per row through ``LoRAWeights.index``
  (the gathered LoRA of S-LoRA/Punica/vLLM). Rows sharing adapters share their slot.
* **Per-row state.** A row is prefilled alone, exactly as the one-request path does it, and then
  joins the batch's KV cache left-padded, with its own attention mask and positions. Each row
  picks its tokens with its own ``TokenPicker`` (logits processors, stopping criteria, RNG).
* **Streaming.** Tokens go to the requesting thread (or event loop), which assembles text and
  cuts stop sequences itself; closing a stream cancels its row, freeing it at the next step.

Greedy outputs equal the one-request path's up to float rounding: a batched matmul may round
differently from a single-row one, which can flip a near-tie (the benchmark counts how often).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import HyperLoRAError, InvalidInputError
from .generation import Chunk, TextAssembler, TokenPicker, last_logits_only
from .lora.adapter import Adapter
from .processors import SamplingParams

if TYPE_CHECKING:
    from .lora.layer import LoRAInjector


class AdapterScope:
    """One request's adapters, folded once: the per-forward scope of the solo path, and the key
    under which the batch shares one slot between requests with the same adapters."""

    def __init__(self, injector: LoRAInjector, adapters: Sequence[Adapter]) -> None:
        self.injector = injector
        self.adapters = tuple(adapters)  # held so the ids in ``key`` stay unique while in use
        self.key = tuple(id(a) for a in self.adapters)
        self.A: dict[str, torch.Tensor] | None = None
        self.B: dict[str, torch.Tensor] | None = None
        if self.adapters:  # concatenate and fold once per call, not once per token
            self.A, self.B = injector.folded(list(self.adapters))

    def __call__(self) -> AbstractContextManager:
        if self.A is None:
            return self.injector.activate(())
        return self.injector.activate_weights(self.A, self.B)


class SlotTable:
    """Reference-counted adapter slots ``(S, L, R, d)`` per module, zero-padded to the largest rank.

    A zero-padded rank row or a module an adapter does not target contributes an exact zero, so
    a slot applies exactly its own adapter's delta.
    """

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.capacity = 0
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self._slot: dict[tuple, int] = {}
        self._refs: dict[tuple, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slot)

    def _grow(self, capacity: int) -> None:
        for table in (self.A, self.B):
            for name, t in table.items():
                table[name] = torch.cat([t, t.new_zeros((capacity - self.capacity, *t.shape[1:]))])
        self._free += list(range(self.capacity, capacity))
        self.capacity = capacity

    def _fit(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        rank, d_in, d_out = a.shape[1], a.shape[2], b.shape[1]
        if name not in self.A:
            shape = (self.capacity, self.num_layers)
            self.A[name] = torch.zeros(*shape, rank, d_in, dtype=self.dtype, device=self.device)
            self.B[name] = torch.zeros(*shape, d_out, rank, dtype=self.dtype, device=self.device)
        extra = rank - self.A[name].shape[2]
        if extra > 0:
            self.A[name] = F.pad(self.A[name], (0, 0, 0, extra))
            self.B[name] = F.pad(self.B[name], (0, extra))

    def acquire(self, scope: AdapterScope) -> int:
        """The slot of ``scope``'s adapters, writing them into a free slot on first use."""
        if scope.key in self._slot:
            self._refs[scope.key] += 1
            return self._slot[scope.key]
        if not self._free:
            self._grow(max(4, 2 * self.capacity))
        slot = self._free.pop(0)
        for name in self.A:
            self.A[name][slot].zero_()
            self.B[name][slot].zero_()
        if scope.A is not None:
            for name, a in scope.A.items():
                b = scope.B[name]
                self._fit(name, a, b)
                self.A[name][slot, :, : a.shape[1]] = a
                self.B[name][slot, :, :, : b.shape[2]] = b
        self._slot[scope.key], self._refs[scope.key] = slot, 1
        return slot

    def release(self, key: tuple) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._free.append(self._slot.pop(key))


class _Row:
    """One request in the batch: its picker, slot, cache position, and where its tokens go."""

    def __init__(
        self, prompt_ids: list[int], scope: AdapterScope, picker: TokenPicker, deliver: Callable[[Any], None]
    ) -> None:
        self.prompt_ids, self.scope, self.picker, self.deliver = prompt_ids, scope, picker, deliver
        self.cancelled = False
        self.slot = -1
        self.pos = len(prompt_ids)
        self.last = -1


class RowTokens:
    """The ``(token, finish_reason)`` stream of one batched row; ``close()`` cancels the row."""

    def __init__(self, scheduler: BatchScheduler, row_queue: queue.SimpleQueue) -> None:
        self._scheduler, self._queue = scheduler, row_queue
        self.row: _Row | None = None
        self._done = False

    def __iter__(self) -> RowTokens:
        return self

    def __next__(self) -> tuple[int | None, str | None]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item[1] is not None:
            self._done = True
        return item

    def close(self) -> None:
        if not self._done and self.row is not None:
            self._done = True
            self.row.cancelled = True
            self._scheduler._wake()


class BatchScheduler:
    """Gathers concurrent requests into one batch decoded by a background thread.

    ``model.enable_batching()`` makes ``stream_chunks``/``complete``/``generate`` go through
    it; ``stats`` counts decoding steps and rows, for benchmarks.
    """

    def __init__(self, model: Any, *, max_batch_size: int = 32) -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise InvalidInputError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.model = model  # a HyperLoRAModel
        self.max_batch_size = max_batch_size
        p = next(model.model.parameters())
        self._device = p.device
        self._vocab = int(model.model.config.get_text_config().vocab_size)
        self._extra = last_logits_only(model.model)
        self._slots = SlotTable(model.injector.num_layers, p.dtype, p.device)
        self._cond = threading.Condition()
        self._pending: deque[_Row] = deque()
        self._active: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = {"steps": 0, "row_steps": 0, "prefills": 0, "max_rows": 0, "cancelled": 0}

    # ------------------------------------------------------------------ client side
    @property
    def active_rows(self) -> int:
        """Rows in the batch now (joined and not yet removed)."""
        return len(self._active)

    @property
    def pending_rows(self) -> int:
        return len(self._pending)

    def submit(
        self, prompt_ids: list[int], scope: AdapterScope, params: SamplingParams, eos_ids: set[int], deliver
    ) -> _Row:
        """Queue a request; ``deliver`` receives ``(token, finish)`` pairs or an exception."""
        row = _Row(list(prompt_ids), scope, TokenPicker(params, prompt_ids, eos_ids, self._vocab), deliver)
        with self._cond:
            if self._closed:
                raise HyperLoRAError("this batch scheduler is closed; call model.enable_batching() again")
            self._pending.append(row)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hyperlora-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return row

    def tokens(self, prompt_ids: list[int], scope: AdapterScope, params: SamplingParams, eos_ids: set[int]):
        """A blocking ``(token, finish)`` iterator for one request (threads)."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        stream = RowTokens(self, q)
        stream.row = self.submit(prompt_ids, scope, params, eos_ids, q.put)
        return stream

    async def atokens(
        self, prompt_ids: list[int], scope: AdapterScope, params: SamplingParams, eos_ids: set[int]
    ) -> AsyncIterator[tuple[int | None, str | None]]:
        """The same for asyncio: tokens arrive on the event loop, no thread per request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        row = self.submit(
            prompt_ids, scope, params, eos_ids, lambda item: loop.call_soon_threadsafe(q.put_nowait, item)
        )
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item[1] is not None:
                    finished = True
                    return
        finally:
            if not finished:
                row.cancelled = True
                self._wake()

    def close(self) -> None:
        """Stop accepting requests; the thread ends once the rows in flight are done."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ the decoding thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._active:
                        if self._closed:
                            return
                        self._cond.wait()
                    joining = []
                    while self._pending and len(self._active) + len(joining) < self.max_batch_size:
                        joining.append(self._pending.popleft())
                self._remove([i for i, row in enumerate(self._active) if row.cancelled])
                for row in joining:
                    self._admit(row)
                if self._active:
                    self._step()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            with self._cond:
                rows = self._active + list(self._pending)
                self._active, self._pending = [], deque()
            self._cache = self._mask = None
            for row in rows:
                row.deliver(exc)
            raise

    def _admit(self, row: _Row) -> None:
        """Prefill a joining row alone (as the solo path does) and merge its cache into the batch."""
        if row.cancelled:
            self.stats["cancelled"] += 1
            return
        try:
            with torch.no_grad(), row.scope():
                out = self.model.model(
                    input_ids=torch.tensor([row.prompt_ids], device=self._device), use_cache=True, **self._extra
                )
            token, finish = row.picker.pick(out.logits[0, -1])
            self._check_cache(out.cache)
        except Exception as exc:
            row.deliver(exc)
            return
        self.stats["prefills"] += 1
        row.deliver((token, finish))
        if finish is not None:
            return
        row.last = token
        row.slot = self._slots.acquire(row.scope)
        self._join(out.cache, len(row.prompt_ids))
        self._active.append(row)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._active))

    @staticmethod
    def _check_cache(cache: Any) -> None:
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise InvalidInputError(
                "batched decoding needs a full-attention model with transformers' DynamicCache "
                "(no sliding-window or hybrid cache); call model.disable_batching()"
            )

    def _join(self, cache: Any, length: int) -> None:
        """Add a one-row cache to the batch's, left-padding whichever is shorter."""
        if self._cache is None:
            self._cache, self._mask = cache, torch.ones(1, length, dtype=torch.long, device=self._device)
            return
        T = self._mask.shape[1]
        new = max(T, length)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, new - T, 0)), F.pad(theirs.keys, (0, 0, new - length, 0))])
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, new - T, 0)), F.pad(theirs.values, (0, 0, new - length, 0))]
            )
        row_mask = F.pad(torch.ones(1, length, dtype=torch.long, device=self._device), (new - length, 0))
        self._mask = torch.cat([F.pad(self._mask, (new - T, 0)), row_mask])

    def _remove(self, indices: list[int]) -> None:
        """Drop finished or cancelled rows, free their slots and trim padding nobody needs."""
        if not indices:
            return
        gone = set(indices)
        for i in gone:
            row = self._active[i]
            self._slots.release(row.scope.key)
            self.stats["cancelled"] += int(row.cancelled)
        keep = [i for i in range(len(self._active)) if i not in gone]
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._device)
        mask = self._mask.index_select(0, index)
        trim = int((mask == 0).sum(dim=1).min())  # leading columns that are padding in every row
        self._mask = mask[:, trim:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]

    def _step(self) -> None:
        """One decoding step for every row in the batch."""
        rows = self._active
        n = len(rows)
        ids = torch.tensor([[row.last] for row in rows], device=self._device)
        positions = torch.tensor([[row.pos] for row in rows], device=self._device)
        mask = torch.cat([self._mask, self._mask.new_ones(n, 1)], dim=1)
        slots = self._slots
        index = torch.tensor([row.slot for row in rows], device=self._device)
        scope = (
            self.model.injector.activate_weights(slots.A, slots.B, index)
            if any(row.scope.A is not None for row in rows)  # else the bare model: no LoRA work at all
            else self.model.injector.activate(())
        )
        try:
            with torch.no_grad(), scope:
                out = self.model.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True
                )
        except Exception as exc:  # the whole batch failed: every row hears why, the batch resets
            for row in rows:
                row.deliver(exc)
                slots.release(row.scope.key)
            self._active, self._cache, self._mask = [], None, None
            return
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["row_steps"] += n
        logits = out.logits[:, -1]
        done = []
        for i, row in enumerate(rows):
            if row.cancelled:
                done.append(i)
                continue
            try:
                token, finish = row.picker.pick(logits[i])
            except Exception as exc:  # e.g. a caller's logits processor: that row only
                row.deliver(exc)
                done.append(i)
                continue
            row.deliver((token, finish))
            row.pos += 1
            row.last = token
            if finish is not None:
                done.append(i)
        self._remove(done)


async def achunks_from_tokens(
    tokens: AsyncIterator[tuple[int | None, str | None]],
    tokenizer: Any,
    stops: Sequence[str],
    prompt_tokens: int,
) -> AsyncIterator[Chunk]:
    """``generation.chunks_from_tokens`` for asyncio (same text assembly, same last chunk)."""
    text = TextAssembler(tokenizer, stops)
    finish = "length"
    completion: list[int] = []
    try:
        async for token, reason in tokens:
            if token is not None:
                completion.append(token)
                piece = text.push(token)
                if piece:
                    yield Chunk(piece)
                if text.stopped:
                    finish = "stop"
                    break
            if reason is not None:
                finish = reason
                break
    finally:
        await tokens.aclose()
    rest = text.flush()
    if rest:
        yield Chunk(rest)
    yield Chunk("", finish, prompt_tokens, len(completion), tuple(completion))
