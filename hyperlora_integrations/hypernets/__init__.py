"""Hypernetworks: Doc-to-LoRA (documents) and Text-to-LoRA (task descriptions)."""

from .base import Hypernetwork
from .config import D2LConfig, HypernetConfig, T2LConfig
from .d2l import DocToLoRA
from .t2l import TextToLoRA

__all__ = ["D2LConfig", "DocToLoRA", "HypernetConfig", "Hypernetwork", "T2LConfig", "TextToLoRA"]
