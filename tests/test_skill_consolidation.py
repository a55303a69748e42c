"""Skill consolidation (issue 22): the description distilled into the adapter, and few-shot fits.

Fast tests run on the tiny random model with a small recipe; they check the mechanics (the
adapter moves the student toward the teacher, gold examples are learned, errors are typed).
"""

from __future__ import annotations

import pytest
import torch

from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.consolidation.distill import fit_soft
from hyperlora_integrations.consolidation.skill import SkillConsolidationConfig, consolidate_skill
from hyperlora_integrations.consolidation.skill_targets import (
    SoftSequence,
    countries,
    example_sequences,
    pool_inputs,
    teacher_sequences,
    vocab_words,
)
from hyperlora_integrations.errors import InvalidInputError

DESCRIPTION = "Give the plural of the English noun."


def small(steps: int = 4, **overrides) -> SkillConsolidationConfig:
    fields = {"pools": {"words": 3, "numbers": 1}, "ranked": 0, "written": 0, "max_new_tokens": 4, "top_k": 5}
    training = ConsolidationConfig(steps=steps, batch_size=4, lr=3e-3, max_seq_tokens=64)
    return SkillConsolidationConfig(training=training, **(fields | overrides))


def test_pools_come_from_local_data_and_respect_exclusions(tiny_model):
    words = vocab_words(tiny_model.tokenizer)
    assert len(words) > 500 and all(w.isalpha() and w.islower() for w in words[:50])
    drawn = pool_inputs(tiny_model, {"words": 20, "numbers": 5}, seed=1, exclude=words[:3000])
    assert len(drawn) == 25 and not set(drawn) & set(words[:3000])
    assert pool_inputs(tiny_model, {"words": 5}, seed=1) == pool_inputs(tiny_model, {"words": 5}, seed=1)
    if countries():  # tzdata or the system's zoneinfo
        assert "France" in countries()


def test_teacher_rows_are_the_described_models_distribution(tiny_model):
    rows = teacher_sequences(tiny_model, DESCRIPTION, ["cat", "house"], max_new_tokens=3, top_k=5)
    assert len(rows) == 2
    for row in rows:
        assert row.prompt == tiny_model.encode("cat" if row is rows[0] else "house")  # no description
        assert row.top_ids.shape == (len(row.target), 5)
        torch.testing.assert_close(row.top_probs.sum(-1), torch.ones(len(row.target)))
        assert (row.top_ids[:, 0] == torch.tensor(row.target)).all()  # greedy: the top token


def test_distillation_moves_the_student_toward_the_teacher(fresh_tiny_model):
    model = fresh_tiny_model
    inputs = ["cat", "dog", "box", "mouse"]
    rows = teacher_sequences(model, DESCRIPTION, inputs, max_new_tokens=4, top_k=20)

    def distance() -> float:
        return sum(_soft_loss(model, r) for r in rows) / len(rows)

    before = distance()
    config = ConsolidationConfig(steps=30, batch_size=4, lr=1e-2)
    result = fit_soft(model, rows, config, seed=0)
    from hyperlora_integrations.lora import Adapter

    adapter = Adapter(result.A, result.B)
    with model.activate([adapter]):
        after = distance()
    assert result.losses[-1] < result.losses[0]
    assert after < before - 0.05, (before, after)


def _soft_loss(model, row: SoftSequence) -> float:
    ids = torch.tensor([row.prompt + row.target])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0, len(row.prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, row.top_ids)
    return float(-(row.top_probs * logp).sum(-1).mean())


def test_examples_are_learned_as_plain_cross_entropy(fresh_tiny_model):
    model = fresh_tiny_model
    pairs = [("cat", "cats"), ("dog", "dogs")]
    before = sum(model.score(x, y) for x, y in pairs)
    config = small(steps=25)
    config.training.lr = 1e-2
    skill = model.generate_skill(DESCRIPTION, examples=pairs, config=config)
    after = sum(model.score(x, y, adapters=[skill]) for x, y in pairs)
    assert after < before - 1.0
    info = skill.metadata.model_extra["consolidation"]
    assert skill.kind == "skill" and skill.metadata.description == DESCRIPTION
    assert info["examples"] == 2 and info["distilled_inputs"] == 0 and info["init"] == "instant"
    rows = example_sequences(model, pairs, weight=2.0)
    assert rows[0].target[-1] == model.tokenizer.eos_token_id and rows[0].weight == 2.0


def test_consolidated_skill_is_deterministic_and_recorded(fresh_tiny_model):
    model = fresh_tiny_model
    a = model.generate_skill(DESCRIPTION, consolidate=True, config=small(), seed=3)
    b = model.generate_skill(DESCRIPTION, consolidate=True, config=small(), seed=3)
    for name in a.A:
        torch.testing.assert_close(a.B[name], b.B[name])
    info = a.metadata.model_extra["consolidation"]
    assert a.metadata.model_extra["consolidated"] is True
    assert info["steps"] == 4 and info["distilled_inputs"] == 4 and info["total_seconds"] >= info["seconds"]
    instant = model.generate_skill(DESCRIPTION)
    assert any(not torch.equal(a.B[n], instant.folded()[1][n]) for n in a.B)  # trained away from it


def test_consolidation_without_a_hypernetwork_starts_from_zero(fresh_tiny_model):
    model = fresh_tiny_model
    model.t2l = None
    skill = model.generate_skill(DESCRIPTION, consolidate=True, config=small())
    assert skill.metadata.model_extra["consolidation"]["init"] == "zero"


def test_exclusions_keep_evaluation_inputs_out(tiny_model):
    words = list(vocab_words(tiny_model.tokenizer)[:4000])
    config = small()
    assert pool_inputs(tiny_model, {"words": 1}, seed=0, exclude=words) == []  # nothing left to draw
    skill = consolidate_skill(tiny_model, DESCRIPTION, None, config=config, exclude_inputs=words)
    assert skill.metadata.model_extra["consolidation"]["distilled_inputs"] == 1  # the one number only


@pytest.mark.parametrize(
    "kwargs",
    [
        {"examples": [("cat",)]},
        {"examples": [("cat", "")]},
        {"examples": [("cat", 3)]},
        {"consolidate": True, "config": ConsolidationConfig()},
        {"consolidate": True, "steps": 0},
    ],
)
def test_bad_arguments_are_typed_errors(tiny_model, kwargs):
    with pytest.raises(InvalidInputError):
        tiny_model.generate_skill(DESCRIPTION, **kwargs)


def test_empty_description_is_refused(tiny_model):
    with pytest.raises(InvalidInputError):
        tiny_model.generate_skill("   ", consolidate=True, config=small())


def test_library_consolidates_now_and_in_the_background(fresh_tiny_model, store):
    from hyperlora_integrations.adapters.worker import worker_for
    from hyperlora_integrations.skills import SkillLibrary

    model = fresh_tiny_model
    model.skill_consolidation_config = small()
    library = SkillLibrary(model, store, router="model")
    now = library.add("plural", DESCRIPTION, consolidate="now")
    assert now.consolidated and now.context is None

    later = library.add("upper", "Rewrite the word in capital letters.", consolidate="background")
    assert not later.consolidated and later.context == later.description  # served with it meanwhile
    worker = worker_for(model, store)
    worker.drain(timeout=300)
    assert library.consolidating() == []
    done = library.get("upper")
    assert done.consolidated and done.adapter.id == later.adapter.id and done.context is None
    assert len(store.list(namespace="skills", kind="skill")) == 2  # replaced, not added
    reopened = SkillLibrary(model, store, router="model")
    assert reopened.get("upper").consolidated


@pytest.mark.parametrize("kwargs", [{"consolidate": "later"}, {"consolidate": "now", "background": True}])
def test_library_refuses_bad_consolidate_arguments(tiny_model, store, kwargs):
    from hyperlora_integrations.skills import SkillLibrary

    with pytest.raises(InvalidInputError):
        SkillLibrary(tiny_model, store, router="model").add("plural", DESCRIPTION, **kwargs)


def test_skill_tools_make_consolidated_skills(fresh_tiny_model, store):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from hyperlora_integrations.langchain import ChatHyperLoRA
    from hyperlora_integrations.langchain import skill_tool as lc_skill_tool
    from hyperlora_integrations.llama_index import HyperLoRALLM
    from hyperlora_integrations.llama_index import skill_tool as li_skill_tool
    from hyperlora_integrations.skills import SkillLibrary

    model = fresh_tiny_model
    model.skill_consolidation_config = small()
    chat = ChatHyperLoRA(model=model, max_tokens=3)
    tool = lc_skill_tool(chat, "plural", DESCRIPTION, consolidate=True)
    assert isinstance(tool.invoke({"input": "cat"}), str)
    library = SkillLibrary(model, store, router="model")
    li_tool = li_skill_tool(
        HyperLoRALLM(model, max_new_tokens=3), "plural", DESCRIPTION, library=library, consolidate=True
    )
    assert li_tool.adapter.metadata.model_extra["consolidated"] is True
    assert library.get("plural").consolidated  # kept: a restart reuses the consolidated skill
    again = li_skill_tool(HyperLoRALLM(model, max_new_tokens=3), "plural", DESCRIPTION, library=library)
    assert again.adapter.id == li_tool.adapter.id
    with pytest.raises(InvalidInputError):
        lc_skill_tool(chat, "plural", DESCRIPTION, consolidate="later")


def test_long_rows_are_cut_to_the_sequence_limit():
    from hyperlora_integrations.consolidation.skill import _within

    row = SoftSequence(list(range(100)), [1, 2, 3], torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2) / 2)
    cut = _within(row, 64)
    assert len(cut.prompt) + len(cut.target) == 64 and cut.target == [1, 2, 3] and cut.prompt[-1] == 99
    assert _within(row, 128) is row


def test_teacher_decoding_with_the_shared_prompt_prefilled_once_equals_plain_left_padding(tiny_model, monkeypatch):
    from hyperlora_integrations.consolidation import skill_targets

    prompts = [
        skill_targets.teacher_prompt(tiny_model, "Write the plural of the noun.", x, True)
        for x in ("cat", "box of matches", "mouse")
    ]
    assert skill_targets._shared_prefix(prompts) >= skill_targets.MIN_SHARED_PREFIX
    shared = skill_targets.decode_batch(tiny_model, prompts, max_new_tokens=6)
    monkeypatch.setattr(skill_targets, "MIN_SHARED_PREFIX", 10**9)  # the plain left-padded batch
    plain = skill_targets.decode_batch(tiny_model, prompts, max_new_tokens=6)
    for (tokens_a, ended_a, logits_a), (tokens_b, ended_b, logits_b) in zip(shared, plain, strict=True):
        assert tokens_a == tokens_b and ended_a == ended_b
        torch.testing.assert_close(logits_a, logits_b, atol=1e-4, rtol=1e-4)


def test_input_scores_are_the_models_logprobs_of_the_whole_prompt(tiny_model):
    from hyperlora_integrations.consolidation import skill_targets

    candidates = ["cat", "New York", "742"]
    scores, head = skill_targets.input_logprobs(tiny_model, DESCRIPTION, candidates)
    prefix, _ = skill_targets._frame_ids(tiny_model, DESCRIPTION)
    output = len(skill_targets.encode_text(tiny_model.tokenizer, "Output:"))
    for text, score in zip(candidates, scores, strict=True):
        ids = skill_targets.teacher_prompt(tiny_model, DESCRIPTION, text, True)[:-output]  # the teacher's own prompt
        assert ids[: len(prefix)] == prefix  # the frame is a prefix of the real prompt
        end = next(i for i in range(len(prefix), len(ids)) if ids[i] in tiny_model.tokenizer.all_special_ids)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(logp[i - 1, ids[i]]) for i in range(len(prefix), end + 1))
        assert abs(float(score) - want) < 1e-3
    assert head.shape == (tiny_model.model.config.vocab_size,)


def test_ranked_inputs_follow_the_pools_mass_and_respect_exclusions(tiny_model, monkeypatch):
    from hyperlora_integrations.consolidation import skill_targets

    def numbers_likely(model, description, candidates):
        scores, head = real(model, description, candidates)
        return torch.tensor([0.0 if c.isdigit() else -50.0 for c in candidates]), head

    real = skill_targets.input_logprobs
    drawn = skill_targets.ranked_inputs(tiny_model, DESCRIPTION, 12, seed=0, exclude=["7"])
    assert len(drawn) == 12 and len(set(drawn)) == 12 and "7" not in drawn
    assert drawn == skill_targets.ranked_inputs(tiny_model, DESCRIPTION, 12, seed=0, exclude=["7"])
    monkeypatch.setattr(skill_targets, "input_logprobs", numbers_likely)
    assert all(x.isdigit() for x in skill_targets.ranked_inputs(tiny_model, DESCRIPTION, 12, seed=0))
    assert skill_targets._shares({"a": 0.0, "b": 0.0, "c": -100.0}, 5) in (
        {"a": 3, "b": 2, "c": 0},
        {"a": 2, "b": 3, "c": 0},
    )
    skill = consolidate_skill(tiny_model, DESCRIPTION, None, config=small(steps=1, ranked=5), exclude_inputs=["7"])
    assert skill.metadata.model_extra["consolidation"]["distilled_inputs"] == 4 + 5  # the random pools, then ranked
