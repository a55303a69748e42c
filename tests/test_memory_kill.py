"""A process SIGKILLed mid-consolidation, while it is still adding turns, loses no turn.

The child process (a real one, killed with SIGKILL like ``kill -9``: no ``finally``, no atexit)
appends a turn every few milliseconds from one thread and consolidates in another; after each
``add_message`` returns it records the turn as acknowledged. It is killed while its job is
running. Then a fresh store sees every acknowledged turn exactly once, a consistent index, the
job still queued for the next worker, and that worker lands the adapter.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.consolidation import ConsolidationConfig
from hyperlora_integrations.memory import MemoryConfig, MemoryManager
from hyperlora_integrations.memory.jobs import through_of

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs SIGKILL")

ROOT = Path(__file__).resolve().parent.parent
# The child holds its job at step 3 (see CHILD), so the kill lands mid-job however fast the
# machine; the next worker runs the same 40 steps in well under a second.
SLOW = ConsolidationConfig(steps=40, batch_size=2, max_seq_tokens=48, lr=2e-2)
CONFIG = MemoryConfig(recent_tokens=48, job_tokens=96, min_job_tokens=24, replay_tokens=0, consolidation=SLOW)

CHILD = r"""
import os, sys, threading, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
torch.set_num_threads(1)
from conftest import make_tiny_model
from hyperlora_integrations.adapters import AdapterStore
from hyperlora_integrations.memory import MemoryConfig, MemoryManager
from hyperlora_integrations.memory.jobs import through_of
path, acks, config = sys.argv[1], sys.argv[2], MemoryConfig.model_validate_json(sys.argv[3])
stepping = acks + ".stepping"
adam_step, steps = torch.optim.Adam.step, []
def held_step(self, *args, **kwargs):   # a job that cannot finish before the parent kills it
    out = adam_step(self, *args, **kwargs)
    steps.append(1)
    if len(steps) == 3:
        open(stepping, "w").close()
        while True:
            time.sleep(1)
    return out
torch.optim.Adam.step = held_step
memory = MemoryManager(make_tiny_model(), AdapterStore(path), config=config).memory("zed")
out = open(acks, "a")
def talk(start, n, pause):
    for i in range(start, start + n):
        memory.add_message("user", f"zed says {i}: my number is {1000 + i}.")
        out.write(f"{i}\n"); out.flush()   # acknowledged: add_message has returned
        time.sleep(pause)
talk(0, 12, 0)
threading.Thread(target=talk, args=(12, 100000, 0.05), daemon=True).start()
memory.consolidate_now()
"""


def test_sigkill_mid_consolidation_loses_no_turn(tiny_model, tmp_path):
    path, acks = tmp_path / "store", tmp_path / "acks"
    stepping = tmp_path / "acks.stepping"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    config = CONFIG.model_copy(update={"background": False})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(acks), config.model_dump_json()], env=env)
    try:
        deadline = time.monotonic() + 180
        running = False
        while time.monotonic() < deadline and child.poll() is None:
            if stepping.exists() and acks.exists() and len(acks.read_text().split()) > 20:
                with AdapterStore(path) as probe:
                    running = any(j.state == "running" for j in probe.pending())
                if running:
                    break
            time.sleep(0.05)
        assert running, "the child never got to consolidating"
        time.sleep(0.3)  # held inside the job's steps, turns still arriving
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert child.returncode == -signal.SIGKILL

    acknowledged = [int(line) for line in acks.read_text().split()]
    with sqlite3.connect(path / "memory.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = AdapterStore(path)
    assert store.verify() == []
    quick = SLOW.model_copy(update={"steps": 2})  # jobs queued from now on; the killed one keeps its own
    manager = MemoryManager(tiny_model, store, config=config.model_copy(update={"consolidation": quick}))
    memory = manager.memory("zed")
    said = [t.content for t in memory.turns()]
    numbers = [int(s.split()[2].rstrip(":")) for s in said]
    assert numbers == sorted(set(numbers)), "a turn was stored twice or out of order"
    assert set(acknowledged) <= set(numbers), "an acknowledged turn was lost"
    assert store.list(namespace=memory.namespace) == []  # the killed job committed nothing
    [job] = store.pending(namespace=memory.namespace)  # ... and is still there for the next worker
    assert job.state == "running"  # owned by a dead worker: the next claim takes it back
    memory.consolidate_now()
    assert memory.watermark >= through_of(job.id) and memory.watermark == memory.window_start() - 1
    assert memory.status().jobs == {"queued": 0, "running": 0, "failed": 0}
    assert [t.content for t in memory.turns()] == said
    store.close()
