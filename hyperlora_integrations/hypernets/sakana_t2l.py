"""Sakana AI's released Text-to-LoRA generator (``HyperModulator``), re-implemented for their checkpoints.

Their T2L (SakanaAI/text-to-lora, ``hyper_llm_modulator.hyper_modulator``) and ours
(``t2l.TextToLoRA``) share the idea (task embedding + layer and module embeddings -> MLP -> heads)
but no block, so this is its own module, with parameter names equal to their state dict's keys:

* task encoder ``Linear + LayerNorm`` to ``latent/2``; layer-depth and layer-type embeddings
  (``Embedding + LayerNorm``, ``latent/4`` each), concatenated in that order;
* ``mixer`` MLP, residual MLPs ``mlp1``, ``mlp2``, and ``mlp3`` to ``head_in_size``; SiLU throughout;
* one head per target module, three shapes (the paper's sizes):
  L: the head emits all ranks of A and B at once;
  M (``shared_AB_head``): the head emits A or B, told which by a learned ``out_emb`` vector;
  S (``autoreg_gen``): the head emits one rank row at a time, told which by a learned position
  embedding (``learnable_pos_emb``) or a rotary embedding of the rank index;
* SFT checkpoints add a (usually zero) ``AB_offset``; reconstruction ones map z-scores back
  (``convert_to_raw_scale``). The delta's scaling is PEFT's ``lora_alpha / r`` (x ``sqrt(r)``
  with rsLoRA, which their training uses).

The module index fed to the layer-type embedding follows the order of peft's
``target_modules`` *set* in their process, which Python's string hashing randomises per process
unless ``PYTHONHASHSEED`` is fixed; the order used in training is not recorded in a checkpoint.
We default to sorted order and take the order as a config field (``module_order``).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import BaseModelMismatchError, InvalidInputError, MissingDependencyError
from ..lora import Adapter, AdapterMetadata
from .base import Hypernetwork
from .config import HypernetConfig

if TYPE_CHECKING:
    from .base import HostModel


class SakanaT2LConfig(HypernetConfig):
    """Their training args that shape the network, plus how descriptions are embedded."""

    kind: Literal["sakana-t2l"] = "sakana-t2l"
    module_order: tuple[str, ...] = Field(min_length=1, max_length=64)
    task_emb_size: int = Field(ge=1, le=65536)
    head_in_size: int = Field(ge=1, le=65536)
    shared_AB_head: bool = False
    autoreg_gen: bool = False
    learnable_pos_emb: bool = False
    head_use_bias: bool = True
    training_task: Literal["sft", "recon"] = "sft"
    pred_z_score: bool = False
    factorized: bool = False
    delta_w_scaling: float = Field(10000.0, gt=0, allow_inf_nan=False)
    # "" = the base model itself (last-token pooling), else a sentence encoder's name (CLS pooling)
    emb_model: str = ""
    emb_pooling: Literal["last_token", "cls"] = "last_token"
    source: str = ""


class _EmbNorm(nn.Sequential):
    def __init__(self, n: int, dim: int) -> None:
        super().__init__(nn.Embedding(n, dim), nn.LayerNorm(dim))


class ResidualBlock(nn.Module):
    """Their ``MLPResidualBlock`` with ``pre_layer_norm=True, post_dropout=True``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(4 * dim, dim),
            nn.SiLU(),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _TaskEncoder(nn.Module):
    def __init__(self, emb: int, out: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(emb, out), nn.LayerNorm(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, positions: int) -> torch.Tensor:
    """Llama rotary embedding (base 10000) of positions ``0..positions-1`` applied to ``x (B, P, D)``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64, device=x.device).float() / dim))
    freqs = torch.arange(positions, device=x.device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


class SakanaTextToLoRA(Hypernetwork):
    config_class = SakanaT2LConfig
    role: ClassVar[str] = "t2l"

    def __init__(self, config: SakanaT2LConfig) -> None:
        super().__init__(config)
        c = config
        if sorted(c.module_order) != sorted(c.module_shapes):
            raise InvalidInputError(
                f"module_order {c.module_order} must list the target modules {sorted(c.module_shapes)}"
            )
        dim, rank, layers = c.latent_dim, c.lora.rank, c.num_layers
        if dim % 4:
            raise InvalidInputError(f"latent size {dim} must be a multiple of 4")
        self.modules_order = list(c.module_order)
        self.task_encoder = _TaskEncoder(c.task_emb_size, dim // 2)
        self.layer_depth_encoder = _EmbNorm(layers, dim // 4)
        self.layer_type_encoder = _EmbNorm(len(self.modules_order), dim // 4)
        self.mixer = nn.Sequential(
            nn.Dropout(0.0), nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim), nn.SiLU()
        )
        self.mlp1, self.mlp2 = ResidualBlock(dim), ResidualBlock(dim)
        self.mlp3 = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(4 * dim, c.head_in_size),
            nn.SiLU(),
        )
        if c.autoreg_gen and c.learnable_pos_emb:
            self.pos_emb = _EmbNorm(rank, dim)
        if c.shared_AB_head:
            self.out_emb = nn.ParameterDict(
                {
                    m: nn.ParameterDict({"A": nn.Parameter(torch.zeros(dim)), "B": nn.Parameter(torch.zeros(dim))})
                    for m in c.module_shapes
                }
            )
            self.out_emb_norm = nn.LayerNorm(dim)
        heads = {}
        for m, (d_in, d_out) in c.module_shapes.items():
            if c.shared_AB_head:
                size = max(d_in, d_out) * (1 if c.autoreg_gen else rank)
            else:
                size = (d_in + d_out) * (1 if c.autoreg_gen else rank)
            heads[m] = nn.Linear(c.head_in_size, size, bias=c.head_use_bias)
        self.heads = nn.ModuleDict(heads)
        shapes = c.module_shapes

        def lora_dict() -> nn.ParameterDict:
            return nn.ParameterDict(
                {
                    "A": nn.ParameterDict({m: nn.Parameter(torch.zeros(layers, rank, shapes[m][0])) for m in shapes}),
                    "B": nn.ParameterDict({m: nn.Parameter(torch.zeros(layers, shapes[m][1], rank)) for m in shapes}),
                }
            )

        self.AB_offset = lora_dict()
        self.mean_recon_target = lora_dict()
        self.std_recon_target = lora_dict()
        self._encoder = None
        self._encoder_lock = threading.Lock()

    # ------------------------------------------------------------------ the network
    def _head_rows(self, m: str, mlp_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mlp_out (L, D)`` -> A ``(L, r, d_in)``, B rows ``(L, r, d_out)`` for module ``m``."""
        c = self.config
        rank = c.lora.rank
        d_in, d_out = c.module_shapes[m]
        head = self.heads[m]
        n = mlp_out.shape[0]
        if not c.shared_AB_head:
            if not c.autoreg_gen:
                out = head(self.mlp3(self.mlp2(mlp_out)))
                a, b = out.split([rank * d_in, rank * d_out], dim=-1)
            else:
                head_in = mlp_out[:, None, :].expand(-1, rank, -1)
                head_in = self.mlp2(self._position(head_in))
                a, b = head(self.mlp3(head_in)).split([d_in, d_out], dim=-1)
            return a.reshape(n, rank, d_in), b.reshape(n, rank, d_out)
        rows = []
        for key, size in (("A", d_in), ("B", d_out)):
            head_in = self.mlp2(mlp_out + self.out_emb_norm(self.out_emb[m][key]))
            if not c.autoreg_gen:
                out = head(self.mlp3(head_in)).view(n, rank, -1)[..., :size]
            else:
                head_in = head_in[:, None, :].expand(-1, rank, -1)
                if c.learnable_pos_emb:
                    head_in = head_in + self.mlp2(self.pos_emb(torch.arange(rank, device=head_in.device))[None])
                else:
                    head_in = self.mlp2(rotary(head_in, rank))
                out = head(self.mlp3(head_in))[..., :size]
            rows.append(out.reshape(n, rank, size))
        return rows[0], rows[1]

    def _position(self, head_in: torch.Tensor) -> torch.Tensor:
        rank = self.config.lora.rank
        if self.config.learnable_pos_emb:
            return head_in + self.pos_emb(torch.arange(rank, device=head_in.device))[None]
        return rotary(head_in, rank)

    def forward(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``task_emb (E,)`` (already normalised, see ``normalize``) -> A ``{m: (L, r, d_in)}``, B ``{m: (L, d_out, r)}``.

        The result is what their ``gen_lora`` writes as PEFT ``lora_A``/``lora_B`` weights.
        """
        c = self.config
        layers = c.num_layers
        idx = torch.arange(layers, device=task_emb.device)
        encoded = self.task_encoder(task_emb.reshape(1, -1)).expand(layers, -1)
        depth = self.layer_depth_encoder(idx)
        A, B = {}, {}
        for i, m in enumerate(self.modules_order):
            kind = self.layer_type_encoder(torch.tensor([i], device=task_emb.device)).expand(layers, -1)
            mlp_out = self.mlp1(self.mixer(torch.cat([encoded, depth, kind], dim=-1)))
            a, b_rows = self._head_rows(m, mlp_out)
            b = b_rows.transpose(1, 2)
            if c.training_task == "sft":
                a, b = a + self.AB_offset["A"][m], b + self.AB_offset["B"][m]
            A[m], B[m] = self._raw_scale(m, a, b)
        return A, B

    def _raw_scale(self, m: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Their ``convert_to_raw_scale`` (reconstruction-trained checkpoints only)."""
        c = self.config
        if c.training_task != "recon":
            return a, b
        if c.factorized:
            if c.pred_z_score:
                a = a * (self.std_recon_target["A"][m] + 1e-10) + self.mean_recon_target["A"][m]
                b = b * (self.std_recon_target["B"][m] + 1e-10) + self.mean_recon_target["B"][m]
            return a + self.AB_offset["A"][m], b + self.AB_offset["B"][m]
        scale = math.sqrt(c.delta_w_scaling)
        return a / scale, b / scale

    @staticmethod
    def normalize(pooled: torch.Tensor) -> torch.Tensor:
        """Their ``_embed_tokens_single_batch``: L2-normalise, then scale by ``sqrt(dim)``."""
        pooled = pooled.to(torch.float32)
        return F.normalize(pooled, dim=-1) * math.sqrt(pooled.shape[-1])

    # ------------------------------------------------------------------ descriptions
    def check_base(self, model: HostModel) -> None:
        from ..base_model import model_name

        super().check_base(model)
        if model_name(self.config.base_model) != model.name:
            raise BaseModelMismatchError(
                f"this Text-to-LoRA checkpoint was trained for {self.config.base_model}; the loaded base model is "
                f"{model.name}. Load {self.config.base_model} (a local copy must sit in a folder named "
                f"{model_name(self.config.base_model)})."
            )

    @staticmethod
    def format_description(text: str) -> str:
        """Their ``add_full_stop``: strip, and end with a period if the last character is a letter."""
        text = text.strip()
        return text + "." if text and text[-1].isalpha() else text

    @torch.no_grad()
    def embed(self, model: HostModel, description: str) -> torch.Tensor:
        """The task embedding their ``embed_texts`` computes for one description."""
        text = self.format_description(description)
        if not self.config.emb_model:  # the base model itself, last token of the final hidden state
            ids = model.tokenizer(text, return_tensors="pt").to(model.base.device)
            out = model.model(**ids, output_hidden_states=True)
            return self.normalize(out.hidden_states[-1][0, -1])
        encoder, tokenizer = self.sentence_encoder()
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=2**13).to(
            next(encoder.parameters()).device
        )
        return self.normalize(encoder(**ids).last_hidden_state[0, 0])

    def sentence_encoder(self):
        """The sentence encoder named by the checkpoint (gte-large-en-v1.5 for the released ones).

        gte-large-en-v1.5 ships its architecture as code on the hub (``trust_remote_code``); we run
        such code only when ``HYPERLORA_TRUST_REMOTE_CODE=1`` is set by whoever loads the model.
        """
        import os

        with self._encoder_lock:
            if self._encoder is None:
                try:
                    from transformers import AutoModel, AutoTokenizer
                except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
                    raise MissingDependencyError(str(exc)) from exc
                trust = os.environ.get("HYPERLORA_TRUST_REMOTE_CODE") == "1"
                name = self.config.emb_model
                try:
                    encoder = AutoModel.from_pretrained(name, trust_remote_code=trust, dtype=torch.float32).eval()
                    tokenizer = AutoTokenizer.from_pretrained(name)
                except (OSError, ValueError) as exc:
                    raise MissingDependencyError(
                        f"cannot load the description encoder {name!r} this checkpoint was trained with: {exc}. "
                        "Download it first (huggingface-cli download ...); if it needs custom code, review it and "
                        "set HYPERLORA_TRUST_REMOTE_CODE=1."
                    ) from exc
                self._encoder = (encoder, tokenizer)
            return self._encoder

    @torch.no_grad()
    def generate_skill(self, model: HostModel, description: str) -> Adapter:
        if not isinstance(description, str) or not description.strip():
            raise InvalidInputError("a skill description must be a non-empty string")
        self.eval()
        param = next(self.parameters())  # the sentence encoder may sit on another device
        A, B = self(self.embed(model, description).to(device=param.device, dtype=param.dtype))
        meta = AdapterMetadata.for_skill(
            description,
            base_model=model.name,
            base_fingerprint=model.fingerprint,
            source="generate_skill",
            generator="sakana-t2l",
        )
        return Adapter(A, B, scaling=self.config.lora.scaling, metadata=meta)
