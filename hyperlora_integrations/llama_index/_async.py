"""Run blocking generation off the event loop.

Decoding is CPU/GPU-bound Python that holds the caller for seconds; LlamaIndex's async APIs
(agents, ``aquery``) expect the loop to stay responsive, so each call runs in a worker thread.
The worker inherits the caller's ``contextvars`` (adapters are applied through one), and a
consumer that stops iterating early stops the worker after at most one more token.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def iterate_in_thread(make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Drive ``make_iter()`` on a worker thread and yield its items on the running loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def post(item: object, exc: BaseException | None = None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, exc))
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False

    def work() -> None:
        iterator = make_iter()
        try:
            for item in iterator:
                if stop.is_set() or not post(item):
                    break
        except BaseException as exc:  # handed to the consumer, re-raised there
            post(_DONE, exc)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        post(_DONE)

    future = loop.run_in_executor(None, contextvars.copy_context().run, work)
    try:
        while True:
            item, exc = await queue.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if future.done():
            future.result()
