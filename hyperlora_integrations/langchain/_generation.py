"""Generation for ``ChatHyperLoRA``: one prepared call streamed as LangChain chunks.

``chunks`` yields text as soon as it is final (tool-call markup held back by ``StreamFilter``),
then a last chunk with the tool calls, usage and ``response_metadata``. ``in_thread`` runs such
a stream in a worker thread for the async API, so the event loop never runs a forward pass.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessageChunk
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk

from ._call import Call
from ._toolcalls import StreamFilter

if TYPE_CHECKING:
    from .chat_models import ChatHyperLoRA


def chunks(chat: ChatHyperLoRA, call: Call) -> Iterator[ChatGenerationChunk]:
    """Stream one call: text as soon as it is final, then a last chunk with everything else."""
    filt = StreamFilter(call.tool_names)
    last = None
    pieces = chat.model.stream_chunks(call.messages, call.adapters, **call.sampling)
    try:
        for piece in pieces:
            if call.deadline is not None and time.monotonic() > call.deadline:
                raise TimeoutError("generation exceeded its timeout")
            text = filt.feed(piece.text) if piece.text else ""
            if text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=text))
            if piece.finish_reason is not None:
                last = piece
    finally:
        pieces.close()
    rest, parsed = filt.finish()
    calls = parsed.calls if call.parallel_tool_calls else parsed.calls[:1]
    finish = "tool_calls" if calls else (last.finish_reason if last else "stop")
    metadata: dict[str, Any] = {
        "model_name": chat.model_name,
        "model_provider": "hyperlora",
        "finish_reason": finish,
        "adapters": call.sources,
        "served_by": call.served_by,
        "references_rejected": call.rejected,
    }
    if call.skill is not None:
        metadata["skill"] = call.skill
    if parsed.error:
        metadata["tool_call_error"] = parsed.error
    prompt_tokens = last.prompt_tokens if last else 0
    completion_tokens = last.completion_tokens if last else 0
    message = AIMessageChunk(
        content=rest,
        tool_call_chunks=[
            tool_call_chunk(
                name=c.name,
                args=json.dumps(c.arguments, ensure_ascii=False),
                id=f"call_{uuid.uuid4().hex[:24]}",
                index=i,
            )
            for i, c in enumerate(calls)
        ],
        usage_metadata={
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        response_metadata=metadata,
        chunk_position="last",
    )
    yield ChatGenerationChunk(message=message)


async def in_thread(make: Callable[[], Iterator[ChatGenerationChunk]]) -> AsyncIterator[ChatGenerationChunk]:
    """Run ``make()`` in a worker thread and hand its chunks to the event loop as they come.

    The loop never runs a forward pass. If the consumer stops early, the worker stops at the
    next token instead of generating the rest of the answer for nobody.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def put(kind: str, item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop closed under us: nobody is listening any more
            cancelled.set()

    def produce() -> None:
        try:
            for chunk in make():
                if cancelled.is_set():
                    return
                put("chunk", chunk)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put("error", exc)
        else:
            put("done", None)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(produce,), name="hyperlora-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, item = await queue.get()
            if kind == "chunk":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        cancelled.set()
