"""OpenAI-compatible request and response bodies (pydantic), and OpenAI-style errors.

Requests accept the fields OpenAI clients send (LangChain's ``ChatOpenAI``, LlamaIndex's
``OpenAILike``, the ``openai`` SDK) and ignore the ones that have no local meaning (penalties,
``user``, ``logprobs=False``...), so those clients work unchanged. Fields we cannot honour
(``n`` > 1, tools) are refused with a 400 instead of being silently dropped. ``adapters`` is our
one extra field: more adapter ids or names to activate with ``model``'s.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import AdapterNotFoundError, DocumentTooLargeError, HyperLoRAError, InvalidInputError


class ContextLengthExceededError(InvalidInputError):
    """A prompt plus its ``max_tokens`` that does not fit the model's context window."""


class RequestTooLargeError(InvalidInputError):
    """A request body over the server's byte limit (refused before it is parsed)."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    adapters: list[str] = Field(default_factory=list, max_length=32)
    """Extra adapter ids or names, activated together with ``model``'s (rank concatenation)."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send n requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """Content as one string; only text parts are understood (images are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidInputError(f"content part of type {part.type!r} is not supported: send text parts")
            parts.append(part.text)
        return "".join(parts)

    def core(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict the core model takes (``developer`` is a system turn)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tool calling is not supported by this server; use ChatHyperLoRA.bind_tools in-process")
        return tools

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send one prompt per request (a list of exactly one string is accepted)")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this server")
        return suffix

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def new_tokens(self) -> int | None:
        return self.max_tokens


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[Document] = Field(min_length=1, max_length=1024)
    consolidate: Literal["now", "background", False] = False
    """``False``: one hypernetwork pass each, done before the reply; ``"now"``: also consolidated
    before the reply; ``"background"``: queued, ids returned at once (answered from the text until
    the adapter is ready)."""


# ---------------------------------------------------------------------- errors
_STATUS = {
    "invalid_request_error": 400,
    "not_found_error": 404,
    "request_too_large": 413,
    "server_error": 500,
}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """``{"error": {...}}`` exactly as OpenAI shapes it, so clients raise their usual exceptions."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI-style body for an exception raised while serving a request.

    A ``HyperLoRAError`` is the caller's mistake (4xx with our message); anything else is ours
    (500, with a message that does not leak internals).
    """
    if isinstance(exc, AdapterNotFoundError):
        return 404, error_body(str(exc), type="invalid_request_error", param="model", code="model_not_found")
    if isinstance(exc, ContextLengthExceededError):
        return 400, error_body(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (DocumentTooLargeError, RequestTooLargeError)):
        return 413, error_body(str(exc), code="request_too_large")
    if isinstance(exc, HyperLoRAError):
        return 400, error_body(str(exc), code="invalid_request")
    return 500, error_body(f"internal error ({type(exc).__name__}); see the server log", type="server_error")


def validation_error(exc: Any) -> tuple[int, dict[str, Any]]:
    """A pydantic ``ValidationError`` as a 400 naming the first bad field."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e['msg']}" for e in errors[:5])
    return 400, error_body(message or str(exc), param=param, code="invalid_request")


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "hyperlora": extra,
    }


def chat_chunk(
    cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None, **more: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        if delta is not None
        else [],
        **more,
    }


def completion_response(
    model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
        "hyperlora": extra,
    }


def completion_chunk(cid: str, model: str, created: int, text: str | None, finish: str | None = None, **more: Any):
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices, **more}
