"""The Ray Serve application: an OpenAI-compatible ingress in front of model replicas.

Two deployments, because OpenAI clients put the adapter in the JSON body (``model``) while Ray
Serve routes by a multiplexed model id set on the handle:

* ``OpenAIIngress`` (FastAPI, no model): reads and validates the body, refuses what is malformed
  or too large before any replica sees it, and calls the server with
  ``multiplexed_model_id=<model>`` so requests for one adapter go to replicas that have it.
* ``HyperLoRAServer`` (the model, a store, a ``ServingEngine``): loads adapters on demand through
  ``@serve.multiplexed`` (an LRU of ``max_adapters_per_replica`` per replica) and decodes with the
  model's continuous batching (``model.enable_batching()``, ``batching.BatchScheduler``): the
  requests in flight in a replica are rows of one batch, each row with its own adapters.

The server streams events (``start``/``delta``/``end``/``error``); the ingress turns them into a
chat or completion response, streamed as server-sent events or whole. Errors found before the
first token (unknown adapter, prompt too long) reach the client as OpenAI-style JSON with a 4xx.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError

from .._optional import require
from .config import ServeConfig
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DocumentsRequest,
    RequestTooLargeError,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    error_for,
    new_id,
    usage,
    validation_error,
)

require("ray.serve", "serve")
require("fastapi", "serve")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402


@serve.deployment(max_ongoing_requests=8)
class HyperLoRAServer:
    """One model replica: adapters multiplexed per replica, requests decoded in threads."""

    def __init__(self, config: dict[str, Any]) -> None:
        from ..adapters import AdapterStore
        from .engine import ServingEngine, Target

        cfg = ServeConfig.model_validate(config)
        self.config = cfg
        self.model = cfg.model.load()
        # the multiplexed LRU below is this replica's adapter cache; the store's own would double it
        self.store = AdapterStore(cfg.store, cache_bytes=0)
        self.engine = ServingEngine(
            self.model,
            self.store,
            namespaces=cfg.namespaces,
            served_model_name=cfg.served_model_name,
            default_max_tokens=cfg.default_max_tokens,
            default_temperature=cfg.default_temperature,
            max_prompt_tokens=cfg.max_prompt_tokens,
            select_adapters=cfg.select_adapters,
        )
        if cfg.batching:  # concurrent requests of this replica decode as rows of one batch
            self.model.enable_batching(max_batch_size=cfg.max_ongoing_requests)

        async def load_adapter(load_key: str):
            return await asyncio.to_thread(self.engine.load, Target.from_load_key(load_key))

        self._load = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)

    async def info(self) -> dict[str, Any]:
        return {"base_model": self.engine.base_name, "fingerprint": self.model.fingerprint}

    async def models(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.engine.models)

    async def add_documents(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            req = DocumentsRequest.model_validate(payload)
            body = await asyncio.to_thread(self.engine.add_documents, req)
        except ValidationError as exc:
            status, body = validation_error(exc)
            return {"status": status, "body": body}
        except Exception as exc:  # a HyperLoRAError is the caller's (4xx); anything else is 500
            status, body = error_for(exc)
            return {"status": status, "body": body}
        return {"status": 200, "body": body}

    async def generate(self, kind: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events of one request: ``start`` (or ``error``), ``delta``s, then ``end`` (or ``error``)."""
        try:
            req = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(payload)
            targets = await asyncio.to_thread(self.engine.targets, req.model, req.adapters)
            loaded = [await self._load(t.load_key) for t in targets if t.text is None]
            plan = await asyncio.to_thread(self.engine.plan, req, targets, loaded)
        except ValidationError as exc:
            status, body = validation_error(exc)
            yield {"type": "error", "status": status, "body": body}
            return
        except Exception as exc:
            status, body = error_for(exc)
            yield {"type": "error", "status": status, "body": body}
            return
        yield {"type": "start", "info": plan.info(), "prompt_tokens": len(plan.prompt_ids)}
        try:
            async for chunk in self.engine.astream(plan):
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield {"type": "delta", "text": chunk.text}
                else:
                    if chunk.text:
                        yield {"type": "delta", "text": chunk.text}
                    yield {
                        "type": "end",
                        "finish_reason": chunk.finish_reason,
                        "prompt_tokens": chunk.prompt_tokens,
                        "completion_tokens": chunk.completion_tokens,
                    }
        except Exception as exc:
            status, body = error_for(exc)
            yield {"type": "error", "status": status, "body": body}


api = FastAPI(title="hyperlora", docs_url=None, redoc_url=None)


def _error(exc: BaseException) -> JSONResponse:
    status, body = error_for(exc)
    return JSONResponse(body, status_code=status)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class OpenAIIngress:
    """HTTP front: parses, validates and formats; the model work happens in ``HyperLoRAServer``."""

    def __init__(self, server: Any, config: dict[str, Any]) -> None:
        self.server = server
        self.config = ServeConfig.model_validate(config)
        self._base: str | None = None

    async def _base_name(self) -> str:
        if self._base is None:
            self._base = (await self.server.info.remote())["base_model"]
        return self._base

    async def _parse(self, request: Request, cls: type[BaseModel]) -> BaseModel | JSONResponse:
        """The body as ``cls``, or the OpenAI-style error response to send instead."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(RequestTooLargeError(f"request body of {declared} bytes is over the {limit}-byte limit"))
        raw = await request.body()
        if len(raw) > limit:
            return _error(RequestTooLargeError(f"request body of {len(raw)} bytes is over the {limit}-byte limit"))
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return JSONResponse(error_body(f"request body is not valid JSON: {exc}", code="invalid_json"), 400)
        if not isinstance(data, dict):
            return JSONResponse(error_body("request body must be a JSON object", code="invalid_request"), 400)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            status, body = validation_error(exc)
            return JSONResponse(body, status_code=status)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            data = await self.server.models.remote()
        except Exception as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> JSONResponse:
        try:
            data = await self.server.models.remote()
        except Exception as exc:
            return _error(exc)
        card = next((c for c in data if c["id"] == model_id), None)
        if card is None:
            body = error_body(f"model {model_id!r} not found", param="model", code="model_not_found")
            return JSONResponse(body, status_code=404)
        return JSONResponse(card)

    @api.post("/v1/documents")
    async def documents(self, request: Request) -> JSONResponse:
        parsed = await self._parse(request, DocumentsRequest)
        if isinstance(parsed, JSONResponse):
            return parsed
        try:
            out = await self.server.add_documents.remote(parsed.model_dump(mode="json"))
        except Exception as exc:
            return _error(exc)
        return JSONResponse(out["body"], status_code=out["status"])

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str):
        parsed = await self._parse(request, ChatCompletionRequest if kind == "chat" else CompletionRequest)
        if isinstance(parsed, JSONResponse):
            return parsed
        try:
            base = await self._base_name()
            handle = self.server.options(stream=True)
            if parsed.model != base:  # route to a replica that already holds this adapter
                handle = self.server.options(stream=True, multiplexed_model_id=parsed.model)
            events = handle.generate.remote(kind, parsed.model_dump(mode="json"))
            first = await events.__anext__()
        except Exception as exc:
            return _error(exc)
        if first["type"] == "error":
            return JSONResponse(first["body"], status_code=first["status"])
        if parsed.stream:
            return StreamingResponse(
                self._sse(kind, parsed, first, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        pieces: list[str] = []
        end: dict[str, Any] = {}
        try:
            async for event in events:
                if event["type"] == "delta":
                    pieces.append(event["text"])
                elif event["type"] == "end":
                    end = event
                elif event["type"] == "error":
                    return JSONResponse(event["body"], status_code=event["status"])
        except Exception as exc:
            return _error(exc)
        text = "".join(pieces)
        if kind == "completion" and parsed.echo:
            text = parsed.text() + text
        make = chat_response if kind == "chat" else completion_response
        return JSONResponse(
            make(
                parsed.model,
                text,
                end.get("finish_reason", "length"),
                end.get("prompt_tokens", first["prompt_tokens"]),
                end.get("completion_tokens", 0),
                first["info"],
            )
        )

    async def _sse(self, kind: str, req: Any, first: dict[str, Any], events: Any) -> AsyncIterator[str]:
        """OpenAI's stream: role chunk, content chunks, a finish chunk, optional usage, ``[DONE]``."""
        cid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())

        def data(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if kind == "chat":
            yield data(
                chat_chunk(cid, req.model, created, {"role": "assistant", "content": ""}, hyperlora=first["info"])
            )
        elif req.echo:
            yield data(completion_chunk(cid, req.model, created, req.text()))
        try:
            async for event in events:
                if event["type"] == "delta":
                    if kind == "chat":
                        yield data(chat_chunk(cid, req.model, created, {"content": event["text"]}))
                    else:
                        yield data(completion_chunk(cid, req.model, created, event["text"]))
                elif event["type"] == "end":
                    if kind == "chat":
                        yield data(chat_chunk(cid, req.model, created, {}, event["finish_reason"]))
                    else:
                        yield data(completion_chunk(cid, req.model, created, "", event["finish_reason"]))
                    if req.include_usage():
                        counts = usage(event["prompt_tokens"], event["completion_tokens"])
                        make = chat_chunk if kind == "chat" else completion_chunk
                        yield data(make(cid, req.model, created, None, usage=counts))
                elif event["type"] == "error":
                    yield data(event["body"])
                    return
        except Exception as exc:  # the replica died mid-stream: say so in the stream, then end it
            yield data(error_for(exc)[1])
            return
        yield "data: [DONE]\n\n"


def build_app(config: ServeConfig):
    """The bound application for ``serve.run``: ingress -> server replicas."""
    server_options: dict[str, Any] = {"num_cpus": config.replica_num_cpus}
    if config.store_resource:
        server_options["resources"] = {config.store_resource: 0.001}
    data = config.model_dump(mode="json")
    server = HyperLoRAServer.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=server_options,
    ).bind(data)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": config.ingress_num_cpus}).bind(server, data)
