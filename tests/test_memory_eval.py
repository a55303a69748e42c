"""``hyperlora eval memory`` end to end on the tiny model, and the fixture's own guarantees: every
gold answer is in the user's words, and none is left in the recent window at the eval's budget
(so the questions test what fell out of the text)."""

from __future__ import annotations

import json

import pytest

from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.memory import MemoryConfig
from hyperlora_integrations.memory.conversation import message_overhead
from hyperlora_integrations.training import eval_memory as ev


def test_fixture_facts_are_stated_and_fall_out_of_the_window(tiny_model):
    users = ev.load_fixture()
    assert len(users) == 8 and all(len(u["questions"]) == 3 for u in users)
    assert len({u["id"] for u in users}) == 8 and all(len(u["sessions"]) >= 3 for u in users)
    budget = ev.parse_args([]).recent_tokens
    overhead = message_overhead(tiny_model)  # the real model's tokenizer and template
    for user in users:
        messages = ev.messages_of(user)
        said = " ".join(m["content"] for m in messages if m["role"] == "user")
        sizes = [tiny_model.count_tokens(m["content"]) + overhead for m in messages]
        window = " ".join(m["content"] for m in messages[ev.window_of(sizes, budget) :]).lower()
        for q in user["questions"]:
            assert q["answer"] in said, (user["id"], q)
            assert q["answer"].lower() not in window, (user["id"], q)
        # another user's answers are not in this conversation: the control cannot answer by luck
        others = [q["answer"] for u in users if u is not user for q in u["questions"]]
        assert not [a for a in others if a.lower() in said.lower()], user["id"]


def test_window_of_matches_the_turn_log_rule():
    assert ev.window_of([5, 5, 5], 10) == 1
    assert ev.window_of([5, 5, 50], 10) == 2  # the newest message always stays
    assert ev.window_of([1, 1], 100) == 0


def test_eval_memory_runs_end_to_end(fresh_tiny_model, tmp_path, monkeypatch):
    from hyperlora_integrations.model import HyperLoRAModel

    model = fresh_tiny_model
    model.consolidation_config = ConsolidationConfig(steps=2, batch_size=2, max_seq_tokens=48, lr=2e-2)
    monkeypatch.setattr(HyperLoRAModel, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    out = tmp_path / "memory.json"
    argv = [
        "--limit", "2", "--max-new-tokens", "2", "--cache", str(tmp_path / "cache"), "--out", str(out),
        "--latency-users", "1", "--latency-tokens", "400", "--latency-every", "5", "--latency-new-tokens", "2",
        "--threads", "1",
    ]  # fmt: skip
    result = ev.main(argv)
    summary = json.loads(out.read_text())["summary"]
    assert summary["questions"] == 6 and summary["questions_out_of_window"] == 6
    assert set(summary["all"]["answer_rate"]) == set(ev.CONDITIONS)
    assert summary["prompt_tokens"]["truncated"] < summary["prompt_tokens"]["full"]
    assert summary["prompt_tokens"]["consolidated"] == summary["prompt_tokens"]["truncated"]
    for row in result["rows"]:
        assert row["prompt_tokens_none"] < row["prompt_tokens_truncated"] < row["prompt_tokens_full"]
    points = result["latency"]
    assert len(points) >= 3 and {p["user"] for p in points} == {"u1"}
    grows = [p["prompt_tokens_full"] for p in points]
    assert grows == sorted(grows) and grows[-1] > 300  # full history grows with the conversation
    assert max(p["prompt_tokens_consolidated"] for p in points) < grows[-1]  # memory's prompt does not
    assert set(summary["latency"]) == {"full", "truncated", "consolidated"}
    for user, info in result["memories"].items():
        assert info["status"]["adapter_bytes"] > 0 and info["adapter"]["steps"] == 2, user
        assert info["adapter"]["memory"]["warm_start_from"], user  # the last job continued the first
    pytest.importorskip("matplotlib")
    assert result["plot"] and (tmp_path / "memory.png").stat().st_size > 0
    # Cached: a rerun trains nothing and serves the same adapters.
    stores = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = ev.evaluate(model, ev.load_fixture()[:2], ev.config_from_args(ev.parse_args(argv), model), max_new_tokens=2,
                        cache=tmp_path / "cache", latency_users=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == stores
    assert [i["adapter"] for i in again["memories"].values()] == [i["adapter"] for i in result["memories"].values()]
    assert [r["prompt_tokens_consolidated"] for r in again["rows"]] == [
        r["prompt_tokens_consolidated"] for r in result["rows"]
    ]


def test_config_from_args_keeps_the_models_recipe(fresh_tiny_model):
    args = ev.parse_args(["--steps", "3", "--recent-tokens", "64", "--job-tokens", "100", "--min-job-tokens", "50"])
    config = ev.config_from_args(args, fresh_tiny_model)
    assert isinstance(config, MemoryConfig) and config.consolidation.steps == 3 and config.recent_tokens == 64
    assert config.consolidation.lr == fresh_tiny_model.consolidation_config.lr and not config.background
