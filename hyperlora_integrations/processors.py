"""Per-call generation arguments in transformers' own vocabulary, and the processors they imply.

``SamplingParams(**kwargs)`` takes what ``model.generate`` takes for decoder-only sampling and
greedy decoding (``top_k``, ``repetition_penalty``, ``min_new_tokens``, ``do_sample``,
``eos_token_id``, ``logits_processor=``, ``stopping_criteria=``, a ``generation_config=``, ...),
validates them with ``GenerationConfig`` and the processors' own constructors, and refuses with
an ``InvalidInputError`` what it cannot honour (beam search, contrastive search, guidance, ...).

Two conventions of this package are kept on top of transformers': ``temperature=0`` (the
default) means greedy decoding, and a positive ``temperature`` without ``do_sample`` samples, as
OpenAI-style clients expect. ``stop`` (our name) and ``stop_strings`` (transformers') are the
same thing and are cut from the text with streaming hold-back, not by a stopping criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers import generation as hf

from .errors import InvalidInputError

_INTS = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "top_k",
    "no_repeat_ngram_size",
    "num_beams",
    "num_return_sequences",
    "pad_token_id",
    "bos_token_id",
)
_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "top_h",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "max_time",
)
_OTHERS = (
    "do_sample",
    "bad_words_ids",
    "renormalize_logits",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "watermarking_config",
    "eos_token_id",
    "use_cache",
)
HONOURED = frozenset(_INTS + _FLOATS + _OTHERS)
"""``GenerationConfig`` fields this package applies (``pad_token_id``/``bos_token_id``/``use_cache``
are accepted for compatibility and change nothing: padding is internal, the cache is always on)."""

_BEAM = "beam search is not supported (decoding is greedy or sampled, one sequence per request)"
_REFUSED = {
    "num_beam_groups": _BEAM,
    "diversity_penalty": _BEAM,
    "length_penalty": _BEAM,
    "early_stopping": _BEAM,
    "constraints": _BEAM,
    "force_words_ids": _BEAM,
    "forced_bos_token_id": "it forces the first position, which is the prompt in a decoder-only model",
    "penalty_alpha": "contrastive search is not supported",
    "dola_layers": "DoLa decoding is not supported",
    "guidance_scale": "classifier-free guidance needs a second unconditional forward pass per token",
    "negative_prompt_ids": "classifier-free guidance needs a second unconditional forward pass per token",
    "token_healing": "token healing rewrites the prompt; encode the prompt you want instead",
    "assistant_model": "assisted (speculative) decoding is not supported",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not supported",
    "num_assistant_tokens": "assisted (speculative) decoding is not supported",
    "streamer": "use stream() or stream_chunks() to stream",
    "output_scores": "this API returns text; observe scores with a logits_processor",
    "output_logits": "this API returns text; observe scores with a logits_processor",
    "output_attentions": "this API returns text",
    "output_hidden_states": "this API returns text",
    "return_dict_in_generate": "this API returns text (the last Chunk carries token ids and counts)",
    "cache_implementation": "the KV cache is managed internally",
    "compile_config": "compilation is not supported",
}
_SAMPLING_ONLY = ("temperature", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_k")


def _bad(message: str) -> InvalidInputError:
    return InvalidInputError(f"bad sampling arguments: {message}")


def _token_list(name: str, value: Any) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        out = tuple(values)
    except TypeError:
        raise _bad(f"{name} must be a token id or a list of token ids, got {value!r}") from None
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise _bad(f"{name} must be a token id or a list of non-negative token ids, got {value!r}")
    return out


class SamplingParams:
    """Validated per-call generation arguments (transformers' names, plus ``stop`` and ``seed``).

    ``config`` is the ``GenerationConfig`` they make; ``logits_processor`` and
    ``stopping_criteria`` are extra transformers objects for this call only. Because processors
    may keep state, pass a fresh instance per call (``TokenPicker`` never shares them between
    requests, and one instance passed to two concurrent calls would be shared by both).
    """

    def __init__(
        self,
        *,
        stop: str | Sequence[str] | None = (),
        seed: int | None = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        stopping_criteria: Sequence[StoppingCriteria] | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> None:
        args: dict[str, Any] = {}
        if generation_config is not None:
            if not isinstance(generation_config, GenerationConfig):
                raise _bad(f"generation_config must be a transformers.GenerationConfig, got {generation_config!r}")
            args.update({k: v for k, v in generation_config.to_diff_dict().items() if k != "transformers_version"})
        args.update(kwargs)
        self._check_names(args)
        self.stop = self._stops(stop, args.pop("stop_strings", None))
        self.seed = self._seed(seed)
        self.logits_processor = self._objects("logits_processor", logits_processor, LogitsProcessor)
        self.stopping_criteria = self._objects("stopping_criteria", stopping_criteria, StoppingCriteria)
        if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
            raise _bad("prefix_allowed_tokens_fn must be callable(batch_id, input_ids) -> list of token ids")
        self.prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        for name in _INTS:
            value = args.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise _bad(f"{name} must be an int, got {value!r}")
        for name in _FLOATS:
            value = args.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _bad(f"{name} must be a finite number, got {value!r}")
            args[name] = float(value)  # transformers' processors insist on floats
        given = "max_new_tokens" in args
        self.max_new_tokens = args.pop("max_new_tokens", None)
        if self.max_new_tokens is None and args.get("max_length") is None:
            if given:  # an explicit None with no max_length is a caller's bug, not "use the default"
                raise _bad("max_new_tokens must be a positive int (or pass max_length), got None")
            self.max_new_tokens = 128
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= 1_000_000:
            raise _bad(f"max_new_tokens must be in [1, 1000000], got {self.max_new_tokens}")
        if args.get("max_length") is not None and args["max_length"] < 1:
            raise _bad(f"max_length must be positive, got {args['max_length']}")
        for name in ("num_beams", "num_return_sequences"):
            if args.get(name) not in (None, 1):
                raise _bad(f"{name}={args[name]}: " + (_BEAM if name == "num_beams" else "call once per sequence"))
        eos = args.pop("eos_token_id", None)
        self.eos_token_ids = _token_list("eos_token_id", eos) if eos is not None else None
        temperature = args.get("temperature")
        if temperature is not None and temperature < 0:
            raise _bad(f"temperature must be >= 0, got {temperature}")
        top_p = args.get("top_p")
        if top_p is not None and not 0 < top_p <= 1:
            raise _bad(f"top_p must be in (0, 1], got {top_p}")
        do_sample = args.get("do_sample")
        if do_sample is None:
            do_sample = bool(temperature)  # our convention: a positive temperature samples
        elif not isinstance(do_sample, bool):
            raise _bad(f"do_sample must be a bool, got {do_sample!r}")
        if do_sample and temperature == 0:
            raise _bad("do_sample=True with temperature=0; pass a positive temperature, or do_sample=False for greedy")
        args["do_sample"] = do_sample
        if temperature == 0:
            args.pop("temperature")  # greedy, said our way: not a sampling flag to warn about
        if not do_sample:  # greedy ignores them, as generate() does; drop them so no warning is logged
            for name in _SAMPLING_ONLY:
                args.pop(name, None)
        self.do_sample = do_sample
        self._sampling_given = {k: kwargs[k] for k in _SAMPLING_ONLY if kwargs.get(k) is not None}
        try:
            self.config = GenerationConfig(max_new_tokens=self.max_new_tokens, **args)
            self.config.validate(strict=True)
        except (ValueError, TypeError) as exc:
            raise _bad(str(exc).strip()) from None
        # Build every processor once now so a bad value fails at call time, not at the first token.
        build_logits_processors(self, torch.zeros(1, 1, dtype=torch.long), {0}, 2, self.max_new_tokens or 1)
        if not do_sample:  # sampling flags the greedy path drops must still be valid values
            probe = dict(self._sampling_given, do_sample=True)
            if probe.get("temperature") in (None, 0, 0.0):
                probe["temperature"] = 1.0
            SamplingParams(max_new_tokens=1, **probe)

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_names(args: dict[str, Any]) -> None:
        for name, value in args.items():
            if name in HONOURED or name == "stop_strings":
                continue
            if name in _REFUSED:
                if value in (None, False) or (name in ("length_penalty", "guidance_scale") and value == 1.0):
                    continue  # "off", as some callers pass explicitly
                raise _bad(f"{name}: {_REFUSED[name]}")
            raise _bad(f"unknown argument {name!r} (use transformers.GenerationConfig names, e.g. max_new_tokens)")
        for name in [n for n in args if n in _REFUSED]:
            args.pop(name)

    @staticmethod
    def _stops(stop: Any, stop_strings: Any) -> tuple[str, ...]:
        out: list[str] = []
        for name, value in (("stop", stop), ("stop_strings", stop_strings)):
            value = (value,) if isinstance(value, str) else (value or ())  # "END" is one stop, not 3
            try:
                value = tuple(value)
            except TypeError:
                raise _bad(f"{name} must be a string or a list of strings, got {value!r}") from None
            if not all(isinstance(s, str) for s in value):
                raise _bad(f"{name} must be a string or a list of strings, got {value!r}")
            out += [s for s in value if s and s not in out]
        return tuple(out)

    @staticmethod
    def _seed(seed: Any) -> int | None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise _bad(f"seed must be a non-negative int, got {seed!r}")
        return seed

    @staticmethod
    def _objects(name: str, value: Any, kind: type) -> tuple:
        if value is None:
            return ()
        items = (value,) if isinstance(value, kind) else value
        try:
            items = tuple(items)
        except TypeError:
            raise _bad(f"{name} must be a list of transformers.{kind.__name__}, got {value!r}") from None
        for item in items:
            if not callable(item):
                raise _bad(f"{name} items must be transformers.{kind.__name__} objects, got {item!r}")
        return items

    # ------------------------------------------------------------------ derived values
    @property
    def temperature(self) -> float:
        return float(self.config.temperature or 0.0) if self.do_sample else 0.0

    @property
    def top_p(self) -> float:
        return float(self.config.top_p if self.config.top_p is not None else 1.0)

    def new_tokens_for(self, prompt_len: int) -> int:
        """The token budget of a prompt: ``max_new_tokens``, else ``max_length`` minus the prompt."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        budget = int(self.config.max_length) - prompt_len
        if budget < 1:
            raise InvalidInputError(
                f"max_length={self.config.max_length} leaves no room after a {prompt_len}-token prompt; "
                "pass max_new_tokens instead"
            )
        return budget

    def __repr__(self) -> str:
        diff = self.config.to_diff_dict()
        diff.pop("transformers_version", None)
        return f"SamplingParams({diff}, stop={self.stop}, seed={self.seed})"


def build_logits_processors(
    params: SamplingParams, prompt: torch.Tensor, eos_ids: set[int], vocab_size: int, max_new_tokens: int
) -> hf.LogitsProcessorList:
    """The processors ``generate()`` would use for ``params`` on ``prompt`` ``(1, n)``, in its order.

    Mirrors ``GenerationMixin._get_logits_processor`` (a private method) with the public classes,
    so it does not break when transformers renames internals. Custom ``logits_processor``
    objects replace a built-in one of the same type and otherwise run after the built-ins and
    before the sampling warpers, as in transformers.
    """
    c = params.config
    n = int(prompt.shape[1])
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long) if eos_ids else None
    out: list[LogitsProcessor] = []
    try:
        if c.sequence_bias is not None:
            out.append(hf.SequenceBiasLogitsProcessor(sequence_bias=c.sequence_bias))
        if c.encoder_repetition_penalty not in (None, 1.0):
            out.append(hf.EncoderRepetitionPenaltyLogitsProcessor(c.encoder_repetition_penalty, prompt))
        if c.repetition_penalty not in (None, 1.0):
            out.append(hf.RepetitionPenaltyLogitsProcessor(c.repetition_penalty))
        if c.no_repeat_ngram_size:
            out.append(hf.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
        if c.bad_words_ids is not None:
            out.append(hf.NoBadWordsLogitsProcessor(c.bad_words_ids, eos))
        if c.min_length and eos is not None:
            out.append(hf.MinLengthLogitsProcessor(c.min_length, eos))
        if c.min_new_tokens and eos is not None:
            out.append(hf.MinNewTokensLengthLogitsProcessor(n, c.min_new_tokens, eos))
        if params.prefix_allowed_tokens_fn is not None:
            out.append(hf.PrefixConstrainedLogitsProcessor(params.prefix_allowed_tokens_fn, 1))
        if c.forced_eos_token_id is not None:
            out.append(hf.ForcedEOSTokenLogitsProcessor(n + max_new_tokens, c.forced_eos_token_id))
        if c.remove_invalid_values:
            out.append(hf.InfNanRemoveLogitsProcessor())
        if c.exponential_decay_length_penalty is not None:
            out.append(hf.ExponentialDecayLengthPenalty(c.exponential_decay_length_penalty, eos, n))
        if c.suppress_tokens is not None:
            out.append(hf.SuppressTokensLogitsProcessor(c.suppress_tokens))
        if c.begin_suppress_tokens is not None:
            out.append(hf.SuppressTokensAtBeginLogitsProcessor(c.begin_suppress_tokens, n))
        custom = list(params.logits_processor)
        out = [next((x for x in custom if type(x) is type(p)), p) for p in out]
        out += [x for x in custom if x not in out]
        if params.do_sample:
            if c.temperature is not None and c.temperature != 1.0:
                out.append(hf.TemperatureLogitsWarper(c.temperature))
            if getattr(c, "top_h", None) is not None and hasattr(hf.logits_process, "TopHLogitsWarper"):
                out.append(hf.logits_process.TopHLogitsWarper(top_h=c.top_h))
            if c.top_k:
                out.append(hf.TopKLogitsWarper(top_k=c.top_k))
            if c.top_p is not None and c.top_p < 1.0:
                out.append(hf.TopPLogitsWarper(top_p=c.top_p))
            if c.min_p is not None:
                out.append(hf.MinPLogitsWarper(min_p=c.min_p))
            if c.typical_p is not None and c.typical_p < 1.0:
                out.append(hf.TypicalLogitsWarper(mass=c.typical_p))
            if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
                out.append(hf.EpsilonLogitsWarper(epsilon=c.epsilon_cutoff))
            if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
                out.append(hf.EtaLogitsWarper(epsilon=c.eta_cutoff))
        if c.watermarking_config is not None:
            out.append(c.watermarking_config.construct_processor(vocab_size, prompt.device))
        if c.renormalize_logits:
            out.append(hf.LogitNormalization())
    except (ValueError, TypeError) as exc:
        raise _bad(str(exc).strip()) from None
    return hf.LogitsProcessorList(out)


def build_stopping_criteria(params: SamplingParams) -> hf.StoppingCriteriaList:
    """``max_time`` and the caller's criteria. EOS, ``max_new_tokens`` and stop strings are
    handled by the decoding loop itself (stop strings with streaming hold-back)."""
    out: list[StoppingCriteria] = []
    if params.config.max_time is not None:
        out.append(hf.MaxTimeCriteria(max_time=params.config.max_time))
    out += list(params.stopping_criteria)
    return hf.StoppingCriteriaList(out)
