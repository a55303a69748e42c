"""The restricted unpickler for Sakana checkpoints refuses anything but data, before it runs."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from sakana_support import FIXTURES, t2l_run

from hyperlora_integrations.errors import CheckpointError, UnsafeFileError
from hyperlora_integrations.hypernets.safe_pickle import PickledEnum, PickledRecord, as_plain, load_checkpoint
from hyperlora_integrations.hypernets.sakana_import import convert_t2l, import_d2l


class RunsCode:
    """What a hostile checkpoint hides: unpickling it would call ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclasses.dataclass
class UnknownConfig:
    value: int = 3


def test_sakana_pickle_with_reduce_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "hypernet_config": RunsCode(marker)}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeFileError, match="refused to unpickle"):
        load_checkpoint(tmp_path / "evil.bin")
    assert not marker.exists()
    # the same file through the importer: the same refusal, nothing ran
    with pytest.raises(UnsafeFileError):
        import_d2l(tmp_path / "evil.bin", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sakana_pickle_with_unknown_class_is_refused(tmp_path):
    torch.save({"hypernet_config": UnknownConfig()}, tmp_path / "unknown.bin")
    with pytest.raises(UnsafeFileError, match="UnknownConfig"):
        load_checkpoint(tmp_path / "unknown.bin")


def test_sakana_pickle_allow_listed_name_gives_a_stand_in_not_their_class(tmp_path):
    # A class that claims to be their config: the pickle names the path, we build our record.
    fake = type("HypernetConfig", (), {"__module__": "ctx_to_lora.modeling.hypernet"})
    obj = fake()
    obj.latent_size = 512
    obj.lora_config = {"r": 8, "target_modules": {"down_proj"}}
    sys.modules.setdefault("ctx_to_lora", type(sys)("ctx_to_lora"))  # pickle needs to find it to *write*
    mod = type(sys)("ctx_to_lora.modeling.hypernet")
    mod.HypernetConfig = fake
    sys.modules["ctx_to_lora.modeling.hypernet"] = mod
    try:
        torch.save({"hypernet_config": obj}, tmp_path / "ok.bin")
    finally:
        del sys.modules["ctx_to_lora.modeling.hypernet"], sys.modules["ctx_to_lora"]
    loaded = load_checkpoint(tmp_path / "ok.bin")["hypernet_config"]
    assert isinstance(loaded, PickledRecord) and type(loaded) is not fake
    assert loaded["latent_size"] == 512
    assert as_plain(loaded) == {"latent_size": 512, "lora_config": {"r": 8, "target_modules": ["down_proj"]}}


def test_sakana_pickle_enum_and_plain_formats(tmp_path):
    # a bare pickle (not torch's zip format) is refused outright
    (tmp_path / "raw.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFileError, match="not a torch zip"):
        load_checkpoint(tmp_path / "raw.bin")
    (tmp_path / "trunc.bin").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.bin")
    enum = type("PeftType", (PickledEnum,), {"qualname": "peft.utils.peft_types.PeftType"})("LORA")
    assert enum == "LORA" and as_plain(enum) == "LORA"


def test_sakana_pickle_real_fixture_loads_as_data(tmp_path):
    target = tmp_path / "pytorch_model.bin"
    with (
        gzip.open(FIXTURES / "gemma2" / "d2l" / "checkpoint-1" / "pytorch_model.bin.gz") as src,
        open(target, "wb") as out,
    ):
        shutil.copyfileobj(src, out)
    state = load_checkpoint(target)
    assert state["base_model_name_or_path"] == "google/gemma-2-2b-it"
    cfg = state["hypernet_config"]
    assert isinstance(cfg, PickledRecord) and cfg.qualname == "ctx_to_lora.modeling.hypernet.HypernetConfig"
    assert as_plain(cfg["lora_config"])["target_modules"] == ["down_proj"]
    assert as_plain(cfg["aggregator_config"])["aggregator_type"] == "perceiver"
    assert isinstance(state["head.weight"], torch.Tensor)
    assert not [name for name in sys.modules if name.startswith("ctx_to_lora")]


def test_sakana_t2l_hostile_hypermod_is_refused(tmp_path):
    run = t2l_run("gemma2", "t2l/gemma_2b_t2l", tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"heads.q_proj.weight": torch.zeros(2), "x": RunsCode(marker)}, run / "hypermod.pt")
    with pytest.raises(UnsafeFileError):
        convert_t2l(run, base_config=FIXTURES / "gemma2" / "gemma-2-2b-it")
    assert not marker.exists()
    # in T2L's state dict not even their config classes are allowed: it holds tensors only
    torch.save({"hypernet_config": UnknownConfig()}, run / "hypermod.pt")
    with pytest.raises(UnsafeFileError):
        convert_t2l(run, base_config=FIXTURES / "gemma2" / "gemma-2-2b-it")


def test_sakana_pickle_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path / "pipe.bin")
