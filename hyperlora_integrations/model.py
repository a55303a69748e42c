"""``HyperLoRAModel``: the framework-free core every integration wraps.

It holds one frozen base model, its tokenizer, the LoRA injector and (optionally) the Doc-to-LoRA
and Text-to-LoRA hypernetworks. Everything per-request (adapters, sampling) is an argument, never
state, so one instance serves many threads and asyncio tasks at once.

Scoring (``score``, ``score_detailed``, ``score_options``) is in ``_scoring.py``; the
fingerprint and default-model checks are in ``_identity.py``. Both are importable from here.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._identity import DEFAULT_HUB_ID, _names_default, _shipped_fingerprint, fingerprint, is_default_model
from ._scoring import ScoringMixin
from .base_model import DEFAULT_MODEL_NAME, BaseModel, load_base_model
from .chat import Prompt, encode_chat, encode_text, to_messages
from .errors import HypernetworkMissingError, InvalidInputError
from .generation import Chunk, SamplingParams, chunks_from_tokens, stream_tokens
from .lora import Adapter, LoRAInjector, load_peft, save_peft
from .lora import merge as _merge
from .lora import unmerge as _unmerge

if TYPE_CHECKING:
    from .batching import AdapterScope, BatchScheduler
    from .hypernets.d2l import DocToLoRA
    from .hypernets.t2l import TextToLoRA

DEFAULT = "default"
_GRAMMAR_KEYS = ("json_schema", "regex", "tools", "tool_choice", "parallel_tool_calls")
"""Call options that constrain decoding to a grammar (``constrained.py``)."""
_DEFAULT_STORE_LOCK = threading.Lock()


class HyperLoRAModel(ScoringMixin):
    """A frozen causal LM plus hypernetworks; adapters are applied per call."""

    def __init__(
        self,
        base: BaseModel,
        *,
        d2l: DocToLoRA | None = None,
        t2l: TextToLoRA | None = None,
        max_context: int | None = None,
    ) -> None:
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.name = base.name
        self.fingerprint = fingerprint(base.model)
        self.injector = LoRAInjector(base.model)
        self.max_context = max_context or int(getattr(base.model.config, "max_position_embeddings", 2048))
        self.d2l = d2l
        self.t2l = t2l
        self._default_store = None
        self.consolidation_config = None  # a ConsolidationConfig; None: the measured default recipe
        self.skill_consolidation_config = None  # a SkillConsolidationConfig; None: the default recipe
        if d2l is not None:
            d2l.check_base(self)
        if t2l is not None:
            t2l.check_base(self)
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self._eos_ids = {e for e in eos if e is not None}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike | None = None,
        *,
        d2l: str | os.PathLike | None = DEFAULT,
        t2l: str | os.PathLike | None = DEFAULT,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HyperLoRAModel:
        """Load a base model and its hypernetworks.

        ``d2l``/``t2l`` take a checkpoint directory, ``None`` for none, or ``"default"``: the
        checkpoint shipped for the default base model (skipped for other base models, which
        have to train their own with ``hyperlora train``).
        """
        from .hypernets import checkpoint

        if _names_default(base_model):
            base_model = None  # the hub id or bare name of the default: the embedded copy, offline
        base = load_base_model(base_model, device=device, dtype=dtype)
        shipped = base_model is None or is_default_model(base.model, base.name)
        if not shipped and "default" in (str(d2l), str(t2l)) and fingerprint(base.model) == _shipped_fingerprint():
            import warnings

            warnings.warn(
                f"{base_model!s} has the architecture of {DEFAULT_MODEL_NAME} but is not recognised as it "
                f"(its name is {base.name!r}), so the shipped hypernetworks were not loaded and internalize/"
                "generate_skill will raise HypernetworkMissingError; load it with from_pretrained() (no path), "
                "or pass d2l=/t2l= checkpoint directories explicitly",
                stacklevel=2,
            )
        d2l_net = checkpoint.resolve("d2l", d2l, shipped=shipped, device=device)
        t2l_net = checkpoint.resolve("t2l", t2l, shipped=shipped, device=device)
        return cls(base, d2l=d2l_net, t2l=t2l_net)

    @property
    def default_store(self):
        """The private ``AdapterStore`` that retrievers and indexes built without ``store=`` share.

        Because they share it, a chat model / LLM built on this same model honours their
        references with no extra argument (the two-line swap). Multi-tenant services pass their
        own store and namespaces explicitly.
        """
        from .adapters import AdapterStore

        with _DEFAULT_STORE_LOCK:
            if self._default_store is None:
                self._default_store = AdapterStore()
            return self._default_store

    @property
    def has_default_store(self) -> bool:
        return self._default_store is not None

    # ------------------------------------------------------------------ prompts and tokens
    def encode(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
        context: str | None = None,
    ) -> list[int]:
        """Prompt ids; ``context`` (a document to stuff) goes before the first user message."""
        return encode_chat(
            self.tokenizer, to_messages(prompt, system), add_generation_prompt=add_generation_prompt, context=context
        )

    def count_tokens(self, text: str) -> int:
        """Exact token count of plain text under the base model's tokenizer."""
        return len(encode_text(self.tokenizer, text))

    @staticmethod
    def estimate_tokens(text: str, encoding: str = "cl100k_base") -> int:
        """A tiktoken estimate, for budgets expressed in an API model's tokens."""
        import tiktoken

        if "TIKTOKEN_CACHE_DIR" not in os.environ:
            import importlib.util

            spec = importlib.util.find_spec("llama_index.core")
            if spec and spec.submodule_search_locations:  # it ships the BPE files; we run offline
                cache = Path(next(iter(spec.submodule_search_locations))) / "_static" / "tiktoken_cache"
                if cache.is_dir():
                    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
        return len(tiktoken.get_encoding(encoding).encode(text, disallowed_special=()))

    # ------------------------------------------------------------------ adapters
    def _checked(self, adapters: Sequence[Adapter] | Adapter) -> list[Adapter]:
        if isinstance(adapters, Adapter):  # one adapter is accepted as well as a list of them
            adapters = [adapters]
        adapters = list(adapters or ())
        for adapter in adapters:
            if not isinstance(adapter, Adapter):
                raise InvalidInputError(f"expected Adapter objects, got {type(adapter).__name__}")
            adapter.check_base(self.name, self.fingerprint)
            self.injector.check(adapter)
        return adapters

    def activate(self, adapters: Sequence[Adapter] = ()):
        """Context manager: ``adapters`` apply to forward passes in this thread/task only."""
        return self.injector.activate(self._checked(adapters))

    def merge(self, adapter: Adapter) -> None:
        """Patch the shared weights (affects every caller); ``unmerge`` restores them."""
        _merge(self.injector, self._checked([adapter])[0])

    def unmerge(self, adapter: Adapter) -> None:
        _unmerge(self.injector, adapter)

    @property
    def hub_id(self) -> str:
        """The id an exported adapter records as its base: the hub id for the default model
        (never this machine's cache path, which means nothing elsewhere), else the name or path
        the model was loaded from."""
        if is_default_model(self.model, self.name):
            return DEFAULT_HUB_ID
        return str(getattr(self.model.config, "_name_or_path", "") or self.name)

    def export_adapter(self, adapter: Adapter, path: str | os.PathLike) -> Path:
        """Save in PEFT format, world-readable (an export is meant to be shared).

        Load it onto a *separate* copy of the base model: ``PeftModel.from_pretrained`` rewires
        the model it is given in place, so passing ``self.model`` would change every caller of
        this ``HyperLoRAModel``. ``to_peft_model(adapter)`` does that for you.
        """
        return save_peft(self._checked([adapter])[0], path, self.injector, self.hub_id)

    def to_peft_model(self, adapter: Adapter):
        """A ``peft.PeftModel`` of ``adapter`` on its own copy of the base weights.

        The copy is built fresh from the config and this model's weights (no hooks), so the PEFT
        model and this ``HyperLoRAModel`` never affect each other; it costs one more copy of the
        base model's memory. Its logits equal ``self`` with ``adapters=[adapter]``.
        """
        import tempfile

        from peft import PeftModel

        adapter = self._checked([adapter])[0]
        copy = type(self.model)(self.model.config)
        copy.load_state_dict(self.model.state_dict())
        copy.to(device=self.base.device, dtype=self.base.dtype).eval()
        with tempfile.TemporaryDirectory(prefix="hyperlora-peft-") as tmp:
            save_peft(adapter, tmp, self.injector, self.hub_id)
            return PeftModel.from_pretrained(copy, tmp)

    def load_adapter(self, path: str | os.PathLike) -> Adapter:
        """Load a PEFT adapter directory (or our single-file format) checked against this model."""
        path = Path(path)
        if path.is_dir():
            return load_peft(path, self.injector, base_name=self.name)
        adapter = Adapter.load(path)
        return self._checked([adapter])[0]

    # ------------------------------------------------------------------ hypernetworks
    def internalize(
        self, text: str, *, source: str = "", progress: bool | None = None, max_rank: int | None = None
    ) -> Adapter:
        """Turn a document into an adapter with one hypernetwork pass per chunk (no gradients).

        Chunk adapters are rank-concatenated; ``max_rank`` then compresses the result with a
        truncated SVD (``lora.compress``) so long documents keep a bounded size.
        """
        if self.d2l is None:
            raise HypernetworkMissingError("this model was loaded without a Doc-to-LoRA hypernetwork")
        adapter = self.d2l.internalize(self, text, source=source, progress=progress)
        if max_rank is not None:
            from .lora import compress

            adapter = compress(adapter, max_rank)
        return adapter

    def consolidate(
        self,
        text: str,
        adapter: Adapter | None = None,
        *,
        steps: int | None = None,
        time_budget_s: float | None = None,
        seed: int = 0,
        progress: bool | None = None,
        config=None,
        source: str = "",
        should_stop=None,
    ) -> Adapter:
        """Learn ``text`` into an adapter by gradient steps on targets built from the text alone.

        Slower than ``internalize`` (tens of seconds instead of one pass) but the result carries
        the document; works without any hypernetwork. ``adapter`` (e.g. ``internalize``'s) is the
        starting point; ``config`` is a ``ConsolidationConfig`` (default: this model's
        ``consolidation_config``, else the measured recipe). See ``consolidation.engine``.
        """
        from .consolidation import consolidate

        return consolidate(
            self,
            text,
            adapter,
            config=config if config is not None else self.consolidation_config,
            steps=steps,
            time_budget_s=time_budget_s,
            seed=seed,
            progress=progress,
            source=source,
            should_stop=should_stop,
        )

    def generate_skill(
        self,
        description: str,
        *,
        examples: Sequence[tuple[str, str]] | None = None,
        consolidate: bool = False,
        steps: int | None = None,
        seed: int = 0,
        progress: bool | None = None,
        config=None,
        time_budget_s: float | None = None,
        should_stop=None,
    ) -> Adapter:
        """Turn a plain-language task description into a skill adapter.

        By default one Text-to-LoRA pass (instant; measured to act as a generic "answer tersely"
        adapter, so serve it with the description in the prompt). ``consolidate=True`` then
        distils the description into the adapter: the student (adapter, no description) learns
        the distribution of the model with the description in its prompt on inputs the task
        may take, so the description can leave the prompt. ``examples`` (``(input, output)``
        pairs) are fitted too. Both work without a hypernetwork (from zero) and take tens of
        seconds; ``config`` is a ``consolidation.SkillConsolidationConfig`` (default: this
        model's ``skill_consolidation_config``, else the default recipe).
        """
        if not consolidate and not examples:
            if self.t2l is None:
                raise HypernetworkMissingError("this model was loaded without a Text-to-LoRA hypernetwork")
            return self.t2l.generate_skill(self, description)
        from tqdm.auto import tqdm

        from .consolidation.skill import consolidate_skill

        instant = self.t2l.generate_skill(self, description) if self.t2l is not None else None
        with tqdm(desc="consolidating skill", unit="step", disable=not progress) as bar:
            return consolidate_skill(
                self,
                description,
                instant,
                examples=examples,
                distill=consolidate,
                config=config if config is not None else self.skill_consolidation_config,
                steps=steps,
                seed=seed,
                time_budget_s=time_budget_s,
                progress=lambda step, loss: bar.update(1),
                should_stop=should_stop,
            )

    # ------------------------------------------------------------------ generation
    def _prepare(
        self,
        prompt: Prompt,
        adapters: Sequence[Adapter],
        system: str | None,
        context: str | None,
        params: SamplingParams,
    ):
        adapters = self._checked(adapters)
        ids = self.encode(prompt, system=system, context=context)
        new_tokens = params.new_tokens_for(len(ids))
        if len(ids) + new_tokens > self.max_context:
            raise InvalidInputError(
                f"prompt of {len(ids)} tokens + {new_tokens} new tokens exceeds the "
                f"{self.max_context}-token context; internalize long documents instead of stuffing them"
            )
        from .batching import AdapterScope  # folds once per call, not once per generated token

        return ids, AdapterScope(self.injector, adapters)

    def _request(
        self, prompt: Prompt, adapters: Sequence[Adapter], system: str | None, context: str | None, sampling: dict
    ) -> tuple[list[int], AdapterScope, SamplingParams]:
        """Validate one call: prompt ids, folded adapters and sampling (with any grammar)."""
        grammar = {key: sampling.pop(key) for key in _GRAMMAR_KEYS if key in sampling}
        constraint = None
        if grammar:
            from .constrained import constraint_processor

            eos = sampling.get("eos_token_id")
            eos_ids = self._eos_ids if eos is None else ({eos} if isinstance(eos, int) else set(eos))
            constraint = constraint_processor(self.tokenizer, eos_ids, **grammar)
            if constraint is not None:
                sampling["logits_processor"] = [*(sampling.get("logits_processor") or ()), constraint]
        try:
            params = SamplingParams(**sampling)
        except TypeError as exc:  # an unknown keyword such as max_tokens=: the caller's mistake
            raise InvalidInputError(f"bad sampling arguments {sorted(sampling)}: {exc}") from None
        ids, scope = self._prepare(prompt, adapters, system, context, params)
        if constraint is not None:  # budget-aware closing needs the budget of this prompt
            constraint.set_budget(params.new_tokens_for(len(ids)))
        return ids, scope, params

    def stream_chunks(
        self,
        prompt: Prompt,
        adapters: Sequence[Adapter] = (),
        *,
        system: str | None = None,
        context: str | None = None,
        **sampling,
    ) -> Iterator[Chunk]:
        """Stream ``Chunk``s; the last one carries finish reason, token counts and token ids.

        ``context`` stuffs a document into the prompt (the baseline internalization replaces).
        ``sampling`` takes ``model.generate``'s keyword arguments for decoder-only decoding
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``min_new_tokens``, ``eos_token_id``, ``generation_config=``,
        ``logits_processor=[...]``, ``stopping_criteria=[...]``, ...) plus ``stop`` and ``seed``;
        see ``processors.SamplingParams``. Beam search and the like raise ``InvalidInputError``.

        ``json_schema=`` (a dict, JSON string or Pydantic class), ``regex=`` or ``tools=`` (with
        ``tool_choice=`` and ``parallel_tool_calls=``) constrain decoding to that grammar
        (``constrained.py``): the output then parses by construction, within ``max_new_tokens``.
        """
        ids, scope, params = self._request(prompt, adapters, system, context, sampling)
        batcher = self._batcher
        if batcher is None:
            yield from stream_tokens(self.model, self.tokenizer, ids, params, scope, self._eos_ids)
        else:
            tokens = batcher.tokens(ids, scope, params, self._eos_ids)
            yield from chunks_from_tokens(tokens, self.tokenizer, params.stop, len(ids))

    # ------------------------------------------------------------------ batching
    _batcher: BatchScheduler | None = None

    def enable_batching(self, max_batch_size: int = 32) -> BatchScheduler:
        """Decode concurrent requests together from now on (``batching.BatchScheduler``).

        Every ``stream_chunks``/``complete``/``generate`` call, from any thread, joins one batch
        decoded by a background thread, each row with its own adapters and sampling arguments;
        ``astream_chunks`` does the same for asyncio without a thread per request. Greedy
        outputs equal the unbatched ones except where batched float rounding flips a near-tie.
        """
        from .batching import BatchScheduler

        self.disable_batching()
        self._batcher = BatchScheduler(self, max_batch_size=max_batch_size)
        return self._batcher

    def disable_batching(self) -> None:
        """Back to one decoding loop per request (rows already in flight finish first)."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    async def astream_chunks(
        self,
        prompt: Prompt,
        adapters: Sequence[Adapter] = (),
        *,
        system: str | None = None,
        context: str | None = None,
        **sampling,
    ) -> AsyncIterator[Chunk]:
        """``stream_chunks`` for asyncio. With batching enabled, tokens arrive on the event loop
        (no thread per request); without it, each chunk is computed in a worker thread."""
        batcher = self._batcher
        if batcher is None:
            stream = self.stream_chunks(prompt, adapters, system=system, context=context, **sampling)
            done = object()
            while (chunk := await asyncio.to_thread(next, stream, done)) is not done:
                yield chunk
            return
        from .batching import achunks_from_tokens

        ids, scope, params = self._request(prompt, adapters, system, context, sampling)
        tokens = batcher.atokens(ids, scope, params, self._eos_ids)
        async for chunk in achunks_from_tokens(tokens, self.tokenizer, params.stop, len(ids)):
            yield chunk

    def stream(self, prompt: Prompt, adapters: Sequence[Adapter] = (), **kwargs) -> Iterator[str]:
        """Stream the answer as text pieces."""
        for chunk in self.stream_chunks(prompt, adapters, **kwargs):
            if chunk.text:
                yield chunk.text

    def complete(self, prompt: Prompt, adapters: Sequence[Adapter] = (), **kwargs) -> Chunk:
        """The whole answer as one ``Chunk`` with finish reason and token counts."""
        pieces = []
        last = Chunk("")
        for chunk in self.stream_chunks(prompt, adapters, **kwargs):
            pieces.append(chunk.text)
            last = chunk
        return Chunk("".join(pieces), last.finish_reason, last.prompt_tokens, last.completion_tokens, last.token_ids)

    def generate(self, prompt: Prompt, adapters: Sequence[Adapter] = (), **kwargs) -> str:
        """Answer ``prompt`` (a string or chat messages) with ``adapters`` active for this call."""
        return self.complete(prompt, adapters, **kwargs).text
