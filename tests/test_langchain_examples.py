"""The LangChain examples run end to end with ``--tiny`` (a subprocess each, as a user runs them).

The tiny model's answers are gibberish, so these check the wiring: both pipelines answer every
question, the swapped one activates the retrieved documents' adapters and sends shorter prompts,
the agent is built and run, and skills are routed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    root = str(EXAMPLES.parent)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_rag_swap_example():
    out = run_example("langchain_rag_swap.py")
    assert out.count("[usual] Q:") == 3 and out.count("[swapped] Q:") == 3
    means = dict(re.findall(r"(usual|swapped): mean prompt tokens (\d+)", out))
    assert int(means["swapped"]) < int(means["usual"])
    swapped = out[out.index("[swapped]") :]
    # Each swapped answer ran with the adapters of exactly the documents its retriever returned.
    pairs = re.findall(r"sources (\[[^\]]*\]), adapters (\[[^\]]*\])", swapped)
    assert len(pairs) == 3 and all(sources == adapters and sources != "[]" for sources, adapters in pairs)
    assert "sources ['Brisk Otter ferry'" in swapped


def test_agent_skills_example():
    out = run_example("langchain_agent_skills.py")
    assert "agent built with " in out
    assert out.count("[agent] task:") == 3 and out.count("[tool] ") == 3
    routed = re.findall(r"-> skill (\w+)", out)
    assert len(routed) == 3 and routed[0] == "translate_to_french"
