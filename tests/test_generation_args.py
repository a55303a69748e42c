"""transformers' generation arguments: accepted, validated, and each with a visible effect.

The strongest check is agreement with ``model.generate`` itself: for every argument in the table
our decoding picks exactly the tokens transformers picks (greedy, or sampled with the same seed),
and the argument changes the output compared with the same call without it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, WatermarkingConfig

from hyperlora_integrations.errors import InvalidInputError
from hyperlora_integrations.processors import SamplingParams

PROMPT = "Tell me about the town."
N = 8
NEWLINE = 198  # what the tiny model's greedy decoding repeats
# name -> (value, other arguments of both the call and the baseline it must differ from)
GREEDY = {
    "repetition_penalty": 2.0,
    "encoder_repetition_penalty": 0.5,
    "no_repeat_ngram_size": 2,
    "bad_words_ids": [[NEWLINE]],
    "suppress_tokens": [NEWLINE],
    "begin_suppress_tokens": [NEWLINE],
    "sequence_bias": [[[NEWLINE], -5.0]],
    "exponential_decay_length_penalty": ((1, 1e4), {"eos_token_id": 3120}),  # its EOS logit is 0
    "forced_eos_token_id": 2,
    "watermarking_config": WatermarkingConfig(bias=30.0, greenlist_ratio=0.1),
}
SAMPLED = {
    "top_k": 5,
    "top_p": 0.3,
    "min_p": 0.5,
    "typical_p": 0.3,
    "epsilon_cutoff": 3e-3,
    "eta_cutoff": (0.1, {"temperature": 0.1}),  # needs a peaked distribution to cut anything
    "temperature": 0.05,
}


def ours(model, **kwargs) -> tuple[int, ...]:
    return model.complete(PROMPT, max_new_tokens=N, **kwargs).token_ids


def theirs(model, **kwargs) -> tuple[int, ...]:
    ids = model.encode(PROMPT)
    torch.manual_seed(kwargs.pop("seed", 0))
    with torch.no_grad():
        out = model.model.generate(torch.tensor([ids]), max_new_tokens=N, **kwargs)[0, len(ids) :].tolist()
    eos = kwargs.get("eos_token_id", model._eos_ids)
    eos = {eos} if isinstance(eos, int) else set(eos)
    return tuple(out[: next((i for i, t in enumerate(out) if t in eos), len(out))])


@pytest.mark.parametrize("name", sorted(GREEDY))
def test_greedy_argument_matches_transformers_and_changes_output(tiny_model, name):
    value, base = GREEDY[name] if isinstance(GREEDY[name], tuple) else (GREEDY[name], {})
    kwargs = {name: value, **base}
    got = ours(tiny_model, **kwargs)
    assert got == theirs(tiny_model, do_sample=False, **kwargs)
    assert got != ours(tiny_model, **base), f"{name} had no effect"


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampling_argument_matches_transformers_and_changes_output(tiny_model, name):
    # top_k=0 switches off transformers' default top_k=50, which we do not apply unasked
    value, base = SAMPLED[name] if isinstance(SAMPLED[name], tuple) else (SAMPLED[name], {})
    base = {"do_sample": True, "seed": 3, "top_k": 0, **base}
    got = ours(tiny_model, **{**base, name: value})
    assert got == theirs(tiny_model, **{**base, name: value})
    assert got != ours(tiny_model, **base), f"{name} had no effect"


def test_min_new_tokens_suppresses_eos(tiny_model):
    eos_bias = {"sequence_bias": [[[2], 100.0]]}  # make EOS the certain first choice
    early = tiny_model.complete(PROMPT, max_new_tokens=N, **eos_bias)
    assert (early.completion_tokens, early.finish_reason) == (0, "stop")
    held = tiny_model.complete(PROMPT, max_new_tokens=N, min_new_tokens=5, **eos_bias)
    assert (held.completion_tokens, held.finish_reason) == (5, "stop")
    assert ours(tiny_model, min_new_tokens=5, **eos_bias) == theirs(tiny_model, min_new_tokens=5, **eos_bias)


def test_repetition_penalty_changes_a_repeated_greedy_continuation(tiny_model):
    plain = ours(tiny_model)
    assert plain == (NEWLINE,) * N  # the tiny model repeats one token
    penalized = ours(tiny_model, repetition_penalty=2.0)
    assert penalized != plain and penalized.count(NEWLINE) < N


def test_top_k_1_equals_greedy_and_plain_sampling_does_not(tiny_model):
    greedy = ours(tiny_model)
    for seed in (0, 1, 2):
        assert ours(tiny_model, do_sample=True, top_k=1, seed=seed) == greedy
        assert ours(tiny_model, do_sample=True, seed=seed) != greedy


def test_do_sample_false_is_greedy_whatever_the_temperature(tiny_model):
    assert ours(tiny_model, do_sample=False, temperature=0.9, top_p=0.5, seed=1) == ours(tiny_model)
    assert ours(tiny_model, temperature=0.9, seed=1) == ours(tiny_model, do_sample=True, temperature=0.9, seed=1)


def test_eos_token_id_replaces_the_models_end_tokens(tiny_model):
    for eos in (NEWLINE, [5, NEWLINE]):
        out = tiny_model.complete(PROMPT, max_new_tokens=N, eos_token_id=eos)
        assert (out.completion_tokens, out.finish_reason, out.text) == (0, "stop", "")


def test_length_arguments(tiny_model):
    n = len(tiny_model.encode(PROMPT))
    assert tiny_model.complete(PROMPT, max_new_tokens=None, max_length=n + 3).completion_tokens == 3
    eos_bias = {"sequence_bias": [[[2], 100.0]]}
    assert tiny_model.complete(PROMPT, max_new_tokens=N, min_length=n + 2, **eos_bias).completion_tokens == 2
    with pytest.raises(InvalidInputError, match="max_length"):
        tiny_model.generate(PROMPT, max_new_tokens=None, max_length=n)
    assert tiny_model.complete(PROMPT, max_new_tokens=N, max_time=0.0).completion_tokens == 1


def test_stop_strings_is_an_alias_of_stop(tiny_model):
    assert tiny_model.generate(PROMPT, max_new_tokens=N, stop_strings=["\n\n"]) == ""
    assert tiny_model.complete(PROMPT, max_new_tokens=N, stop_strings="\n\n").finish_reason == "stop"


def test_generation_config_object_and_kwargs_agree(tiny_model):
    config = GenerationConfig(repetition_penalty=2.0, no_repeat_ngram_size=3)
    assert ours(tiny_model, generation_config=config) == ours(
        tiny_model, repetition_penalty=2.0, no_repeat_ngram_size=3
    )
    # a keyword overrides the config, as in generate()
    assert ours(tiny_model, generation_config=config, repetition_penalty=1.0, no_repeat_ngram_size=0) == ours(
        tiny_model
    )


def test_compatibility_arguments_change_nothing(tiny_model):
    same = ours(tiny_model, pad_token_id=0, bos_token_id=1, use_cache=True, num_beams=1, num_return_sequences=1)
    assert same == ours(tiny_model)


class ForceToken(LogitsProcessor):
    """Only ``token`` may follow; records the ids it was shown."""

    def __init__(self, token: int) -> None:
        self.token, self.seen = token, []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.shape[1])
        out = torch.full_like(scores, float("-inf"))
        out[:, self.token] = 0.0
        return out


class StopAfter(StoppingCriteria):
    def __init__(self, prompt_len: int, n: int) -> None:
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.n, dtype=torch.bool)


def test_custom_logits_processor_and_stopping_criteria(tiny_model):
    n = len(tiny_model.encode(PROMPT))
    force = ForceToken(1000)
    out = tiny_model.complete(PROMPT, max_new_tokens=N, logits_processor=[force], stopping_criteria=[StopAfter(n, 3)])
    assert out.token_ids == (1000, 1000, 1000) and out.finish_reason == "stop"
    assert force.seen == [n, n + 1, n + 2]  # the prompt plus the completion so far, as in generate()
    # a custom processor also runs before the sampling warpers: sampling cannot escape it
    assert ours(tiny_model, do_sample=True, seed=0, logits_processor=[ForceToken(7)]) == (7,) * N


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_beams": 2}, "beam search"),
        ({"num_return_sequences": 2}, "once per sequence"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive"),
        ({"guidance_scale": 2.0}, "guidance"),
        ({"output_scores": True}, "logits_processor"),
        ({"streamer": object()}, "stream"),
        ({"max_tokens": 5}, "unknown argument"),
        ({"top_k": -1, "do_sample": True}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "penalty"),
        ({"repetition_penalty": float("nan")}, "finite"),
        ({"typical_p": -0.5}, "typical_p"),  # refused even when greedy would ignore it
        ({"do_sample": True, "temperature": 0}, "temperature"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"no_repeat_ngram_size": -2}, "ngram"),
        ({"generation_config": {"top_k": 3}}, "GenerationConfig"),
        ({"logits_processor": [3]}, "LogitsProcessor"),
        ({"suppress_tokens": [NEWLINE], "forced_eos_token_id": NEWLINE}, "suppress"),
    ],
)
def test_refused_arguments_say_why(tiny_model, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        SamplingParams(max_new_tokens=2, **kwargs)
    with pytest.raises(InvalidInputError):
        tiny_model.generate("hi", **{"max_new_tokens": 2, **kwargs})


def test_langchain_and_llamaindex_pass_per_call_generation_arguments(tiny_model):
    """ChatHyperLoRA and HyperLoRALLM hand transformers' arguments through to the core per call,
    as ChatHuggingFace / HuggingFaceLLM users expect (constructor defaults are tested with them)."""
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from hyperlora_integrations.langchain import ChatHyperLoRA
    from hyperlora_integrations.llama_index import HyperLoRALLM

    forced = tiny_model.tokenizer.decode([1000] * N)
    chat = ChatHyperLoRA(model=tiny_model, max_tokens=N)
    assert chat.invoke(PROMPT, logits_processor=[ForceToken(1000)]).content == forced
    assert chat.invoke(PROMPT, repetition_penalty=2.0).content != chat.invoke(PROMPT).content
    llm = HyperLoRALLM(tiny_model, max_new_tokens=N)
    assert llm.complete(PROMPT, logits_processor=[ForceToken(1000)]).text == forced
    assert llm.complete(PROMPT, repetition_penalty=2.0, top_k=3).text != llm.complete(PROMPT).text
    with pytest.raises(InvalidInputError, match="beam"):
        llm.complete(PROMPT, num_beams=3)
