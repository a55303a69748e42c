"""Argument checking shared by the integrations: no unknown or misspelt argument passes silently.

Framework classes are pydantic models whose base classes accept and drop unknown keywords;
a newcomer's ``temprature=0.3`` or ``max_tokens=5`` on the wrong class then does nothing, with
no error. These helpers sort a constructor's or call's keywords into known fields, generation
arguments the core decoder accepts (``SamplingParams``), and mistakes, which raise ``TypeError``
naming the closest known argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .model import HyperLoRAModel


def generation_names() -> list[str]:
    """Keyword arguments the core decoder knows (``SamplingParams``: transformers'
    ``GenerationConfig`` names plus ``stop`` and ``seed``). Names it knows but refuses (beam
    search, ...) count as known: ``SamplingParams`` then says why it refuses them."""
    import inspect

    from .generation import SamplingParams

    names = {p for p in inspect.signature(SamplingParams).parameters if p not in ("self", "kwargs")}
    if dataclasses.is_dataclass(SamplingParams):
        names |= {f.name for f in dataclasses.fields(SamplingParams)}
    try:
        from . import processors

        names |= set(processors.HONOURED) | set(getattr(processors, "_REFUSED", {})) | {"stop_strings"}
    except ImportError:  # an older core without transformers' full argument set
        pass
    return sorted(names)


def is_generation_name(name: str) -> bool:
    """Whether the core decoder knows the keyword ``name``."""
    return name in generation_names()


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unexpected(owner: str, names: Iterable[str], choices: Iterable[str]) -> TypeError:
    """The ``TypeError`` for unknown keywords, with a suggestion per name and the valid ones."""
    choices = sorted(set(choices))
    parts = [f"{n!r}{did_you_mean(n, choices)}" for n in sorted(names)]
    return TypeError(f"{owner} got unexpected keyword arguments: {', '.join(parts)}; valid: {', '.join(choices)}")


def check_generation_kwargs(owner: str, kwargs: dict[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """Refuse names the core decoder does not accept (``TypeError``) and values it would refuse
    (``InvalidInputError``), at construction or call time rather than at the first token."""
    from .generation import SamplingParams

    bad = [name for name in kwargs if not is_generation_name(name)]
    if bad:
        raise unexpected(owner, bad, [*known, *generation_names()])
    try:
        SamplingParams(**kwargs)
    except TypeError as exc:
        raise InvalidInputError(f"{owner}: bad generation arguments {sorted(kwargs)}: {exc}") from None
    return kwargs


# Per-call keywords both skill tools pass on to their model (besides generation arguments).
TOOL_CALL_KEYS = ("max_tokens", "max_new_tokens", "temperature", "top_p", "seed", "stop")


def check_tool_generation(owner: str, kwargs: dict[str, Any], extra: Iterable[str] = ()) -> None:
    """Refuse, when a tool is made, keywords its every call would refuse."""
    known = [*TOOL_CALL_KEYS, *extra]
    unknown = [k for k in kwargs if k not in known and not is_generation_name(k)]
    if unknown:
        raise unexpected(owner, unknown, [*known, *generation_names()])


@functools.lru_cache(maxsize=2)
def shared_model(base_model: str | None, d2l: str | None = "default", t2l: str | None = "default") -> HyperLoRAModel:
    """Load (once per process) a model named by a string, so wrappers built from names share weights."""
    from .model import HyperLoRAModel

    return HyperLoRAModel.from_pretrained(base_model, d2l=d2l, t2l=t2l)


def model_from(value: Any, owner: str) -> HyperLoRAModel:
    """A ``HyperLoRAModel`` as given, or loaded from a model name/path (shared per process)."""
    from .model import HyperLoRAModel

    if isinstance(value, HyperLoRAModel):
        return value
    if value is None or isinstance(value, (str, os.PathLike)):
        return shared_model(None if value is None else str(value))
    inner = getattr(value, "hyperlora_model", None) or getattr(value, "model", None)
    if isinstance(inner, HyperLoRAModel):  # a ChatHyperLoRA or HyperLoRALLM
        return inner
    raise InvalidInputError(f"{owner} needs a HyperLoRAModel or a base model name/path, got {type(value).__name__}")


def sort_constructor_arguments(
    owner: str, cls: type, values: dict[str, Any], aliases: dict[str, str] | None = None
) -> dict[str, Any]:
    """LangChain's convention for constructor keywords of a pydantic class that are not fields.

    ``aliases`` (Hugging Face names such as ``max_new_tokens``) map to their field; a generation
    argument the core decoder accepts moves to ``model_kwargs`` with a warning (as
    ``langchain_core``'s ``_build_model_kwargs`` does); any other unknown keyword, typically a
    misspelt field (``temprature``), raises ``TypeError`` naming the closest field.
    """
    import warnings

    aliases = aliases or {}
    values = dict(values)
    for alias, name in aliases.items():
        if alias in values:
            if name in values:
                raise TypeError(f"{owner}: pass {name} or {alias}, not both")
            values[name] = values.pop(alias)
    fields = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
    extra = dict(values.get("model_kwargs") or {})
    for key in list(values):
        if key in fields:
            continue
        if not is_generation_name(key):
            raise unexpected(owner, [key], [*fields, *aliases])
        if key in extra:
            raise TypeError(f"{owner}: {key} given both directly and in model_kwargs")
        warnings.warn(
            f"{key} is not a {owner} field; it was transferred to model_kwargs and is passed to "
            "every call. Please confirm that it is what you intended.",
            stacklevel=5,
        )
        extra[key] = values.pop(key)
    for key in [k for k in extra if k in fields or k in aliases]:
        raise TypeError(f"{owner}: pass {key} directly, not in model_kwargs")
    if extra:
        check_generation_kwargs(owner, extra, fields)
        values["model_kwargs"] = extra
    return values
