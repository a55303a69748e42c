"""What one ``ChatHyperLoRA`` call resolves before generation starts (``prepare``).

Its options (sampling, generation arguments, tools, response format), its prompt (tool schemas
and the JSON instruction added to the system message, adapter references removed) and its
adapters, from the four places the chat model's docstring lists, each applied once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from .._arguments import check_generation_kwargs, is_generation_name, unexpected
from ..adapters.references import strip_references
from ..adapters.routing import route
from ..chat import last_user_text
from ..errors import InvalidInputError
from ..lora import Adapter
from ._messages import to_core_messages
from ._toolcalls import ToolSpec, grammar_options, render_tools

if TYPE_CHECKING:
    from .chat_models import ChatHyperLoRA

log = logging.getLogger("hyperlora_integrations.langchain.chat_models")

# Call options that arrive through ``bind``/``invoke`` kwargs and are understood here.
SAMPLING_KEYS = ("temperature", "max_tokens", "top_p", "seed", "timeout")
# Accepted for drop-in compatibility with API-backed chat models; they have no local effect.
IGNORED_KEYS = ("stream", "stream_usage", "strict", "ls_structured_output_format", "structured_output_format")
# Hugging Face names of fields, accepted as aliases (``max_new_tokens=`` is ``max_tokens=``).
ALIASES = {"max_new_tokens": "max_tokens"}


@dataclass
class Call:
    """Everything one call resolved before generation starts."""

    messages: list[dict[str, str]]
    adapters: list[Adapter]
    sources: list[dict[str, Any]]
    sampling: dict[str, Any]
    deadline: float | None
    tool_names: list[str]
    parallel_tool_calls: bool
    served_by: dict[str, str] = field(default_factory=dict)
    rejected: int = 0
    skill: dict[str, Any] | None = None


def add_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """Append ``text`` to the leading system message, or start the conversation with one."""
    if messages and messages[0]["role"] == "system":
        head = messages[0]["content"]
        return [{"role": "system", "content": f"{head}\n\n{text}" if head.strip() else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def json_instruction(response_format: dict[str, Any]) -> str:
    schema = response_format.get("schema")
    if response_format.get("type") == "json_schema" and schema:
        return "Reply with only a JSON object that conforms to this JSON schema, with no other text:\n" + json.dumps(
            schema, ensure_ascii=False
        )
    text = "Reply with only a valid JSON object, with no other text."
    if schema:
        text += " Use this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return text


def _warn_unhonoured_once(chat: ChatHyperLoRA, count: int) -> None:
    """One warning per chat model: references it could not honour were stripped from the prompt."""
    if chat._warned_unhonoured:
        return
    chat._warned_unhonoured = True
    log.warning(
        "%d adapter reference(s) in the prompt could not be honoured and were removed: build the "
        "retriever on the same HyperLoRAModel, or pass references_from=[retriever] / adapter_store= "
        "(and reference_namespaces=) to this chat model",
        count,
    )


def tool_spec(tool: dict[str, Any]) -> ToolSpec:
    """A bound tool (OpenAI tool format) as the prompt and the grammar see it."""
    fn = tool["function"]
    return ToolSpec(fn["name"], fn.get("description", ""), fn.get("parameters", {}))


def prepare(chat: ChatHyperLoRA, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> Call:
    """Resolve one call: its options, prompt (tools, JSON instruction, references removed),
    adapters (references, ``adapters=``, the skill) and sampling arguments."""
    kwargs = dict(kwargs)
    override = kwargs.pop("model", None)
    if override is not None and override != chat.model_name:
        raise InvalidInputError(
            f"this ChatHyperLoRA serves {chat.model_name!r}; per-call model override ({override!r}) "
            "is not supported: construct another ChatHyperLoRA"
        )
    explicit = kwargs.pop("adapters", None) or ()
    tools = kwargs.pop("tools", None) or []
    choice = kwargs.pop("tool_choice", None)
    parallel = kwargs.pop("parallel_tool_calls", None)
    response_format = kwargs.pop("response_format", None)
    for alias, name in ALIASES.items():
        if alias in kwargs:
            if name in kwargs:
                raise TypeError(f"pass {name} or {alias}, not both")
            kwargs[name] = kwargs.pop(alias)
    sampling = {key: kwargs.pop(key) for key in SAMPLING_KEYS if key in kwargs}
    for key in IGNORED_KEYS:
        kwargs.pop(key, None)
    unknown = [key for key in kwargs if not is_generation_name(key)]
    if unknown:
        call_keys = [*SAMPLING_KEYS, *ALIASES, "adapters", "tools", "tool_choice", "stop", "response_format"]
        raise unexpected("ChatHyperLoRA call", unknown, call_keys)
    generation = check_generation_kwargs("ChatHyperLoRA call", {**chat.model_kwargs, **kwargs})

    core = to_core_messages(messages)
    specs = [tool_spec(t) for t in tools] if choice != "none" else []
    if specs:
        core = add_system(core, render_tools(specs, choice))
    if response_format:
        core = add_system(core, json_instruction(response_format))

    # References: verified ones become adapters; every reference-shaped string is removed.
    served: dict[str, str] = {}
    rejected = 0
    adapters: list[Adapter] = []
    sources: list[dict[str, Any]] = []
    resolver = chat._resolver or chat._default_resolver()
    if resolver is not None:
        resolution = resolver.resolve(core)
        if chat.select_adapters:
            resolution = route(chat.model, resolution, last_user_text(resolution.messages))
        core, served, rejected = resolution.messages, dict(resolution.served_by), resolution.rejected
        for adapter, ref in zip(resolution.adapters, resolution.adapter_references, strict=True):
            adapters.append(adapter)
            sources.append(describe(adapter, "reference", namespace=ref.namespace))
    else:
        stripped = [strip_references(m["content"]) for m in core]
        rejected += sum(n for _, n in stripped)
        core = [{**m, "content": clean} for m, (clean, _) in zip(core, stripped, strict=True)]
    if rejected:
        _warn_unhonoured_once(chat, rejected)

    for adapter in explicit:
        if not isinstance(adapter, Adapter):
            raise InvalidInputError(f"adapters= takes Adapter objects, got {type(adapter).__name__}")
        adapters.append(adapter)
        sources.append(describe(adapter, "adapters"))

    skill_info = None
    if chat.skill_adapter is not None:
        adapters.append(chat.skill_adapter)
        sources.append(describe(chat.skill_adapter, "with_skill"))
    elif chat.auto_skill:
        request = last_user_text(core)
        if request is not None:
            ranked = chat.skills.scores(request)
            chosen = chat.skills.route(request, threshold=chat.skill_threshold)
            if chosen is not None:
                adapters.append(chosen.adapter)
                sources.append(describe(chosen.adapter, "auto_skill"))
                skill_info = {"name": chosen.name, "score": round(dict(ranked)[chosen.name], 4)}

    # One adapter via two routes: apply once. The same id in two namespaces is two adapters.
    unique: dict[tuple[str, str | None], Adapter] = {}
    described: dict[tuple[str, str | None], dict[str, Any]] = {}
    for adapter, source in zip(adapters, sources, strict=True):
        key = (adapter.id, source.get("namespace"))
        if key[1] is None and any(k[0] == adapter.id for k in unique):
            continue
        unique.setdefault(key, adapter)
        described.setdefault(key, source)

    stops = stop if stop is not None else chat.stop
    max_tokens = sampling.get("max_tokens", chat.max_tokens)
    if max_tokens is None:
        max_tokens = max(1, chat.model.max_context - len(chat.model.encode(core)))
    timeout = sampling.get("timeout", chat.timeout)
    return Call(
        messages=core,
        adapters=list(unique.values()),
        sources=list(described.values()),
        sampling={
            **generation,
            "max_new_tokens": int(max_tokens),
            "temperature": float(sampling.get("temperature", chat.temperature)),
            "top_p": float(sampling.get("top_p", chat.top_p)),
            "seed": sampling.get("seed", chat.seed),
            "stop": tuple(stops or ()),
            **grammar_options(specs, choice, parallel is not False, response_format),
        },
        deadline=time.monotonic() + timeout if timeout else None,
        tool_names=[s.name for s in specs],
        parallel_tool_calls=parallel is not False,
        served_by=served,
        rejected=rejected,
        skill=skill_info,
    )


def describe(adapter: Adapter, via: str, namespace: str | None = None) -> dict[str, Any]:
    """What ``response_metadata["adapters"]`` says of one adapter a call used."""
    info = {"id": adapter.id, "kind": adapter.kind, "source": adapter.metadata.source, "via": via}
    if namespace is not None:
        info["namespace"] = namespace
    return info
