"""CPU stand-ins for the CUDA-only pieces Sakana's reference code calls (fixture generation only).

Their Doc-to-LoRA Perceiver (``ctx_to_lora/modeling/idefics2.py``) only exists as a
flash-attention-2 module (the eager class is commented out of its registry, and the resampler
asserts flash attention). flash-attn needs CUDA, so this writes a package named ``flash_attn``
whose two kernels (``flash_attn_varlen_func``, ``flash_attn_func``) and padding helpers
(``flash_attn.bert_padding``) are plain-torch equivalents of flash-attn 2.x's documented
semantics, and makes transformers 4.51.3 report flash attention as available so that *its own*
``_flash_attention_forward`` (unpadding, cu_seqlens handling) runs unchanged around them.

Nothing here is used by hyperlora_integrations; it lets their code run in a throwaway venv.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

FLASH_ATTN_INIT = textwrap.dedent(
    '''
    """Plain-torch flash_attn 2.x kernels (varlen and dense), exact attention, for CPU runs."""
    import math

    import torch

    __version__ = "2.7.4"


    def _attend(q, k, v, scale, causal, softcap=0.0):
        # q (Tq, H, D), k/v (Tk, Hk, D); flash-attn repeats kv heads for GQA itself
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if causal:  # bottom-right aligned, as flash-attn >= 2.1
            tq, tk = q.shape[0], k.shape[0]
            mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, causal=False, softcap=0.0, **kwargs):
        assert dropout_p == 0.0
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        out = torch.empty_like(q)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]],
                                            scale, causal, softcap)
        return out


    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, **kwargs):
        assert dropout_p == 0.0
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return torch.stack([_attend(q[b], k[b], v[b], scale, causal, softcap) for b in range(q.shape[0])])
    '''
)

BERT_PADDING = textwrap.dedent(
    '''
    """flash_attn.bert_padding (2.7 signatures), plain torch."""
    import torch
    import torch.nn.functional as F


    def index_first_axis(x, indices):
        return x[indices]


    def unpad_input(hidden_states, attention_mask, unused_mask=None):
        all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
        seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
        used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
        max_seqlen_in_batch = seqlens_in_batch.max().item()
        cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
        flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
        return flat[indices], indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


    def pad_input(hidden_states, indices, batch, seqlen):
        out = torch.zeros(batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype,
                          device=hidden_states.device)
        out[indices] = hidden_states
        return out.reshape(batch, seqlen, *hidden_states.shape[1:])
    '''
)


def install(root: Path) -> None:
    """Write the ``flash_attn`` stand-in under ``root``, put it first on sys.path, patch transformers.

    Must run before transformers' modeling modules (and Sakana's) are imported.
    """
    pkg = root / "flash_attn"
    (pkg / "layers").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(FLASH_ATTN_INIT)
    (pkg / "bert_padding.py").write_text(BERT_PADDING)
    (pkg / "layers" / "__init__.py").write_text("")
    (pkg / "ops" / "triton").mkdir(parents=True, exist_ok=True)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "rotary.py").write_text(
        "def apply_rotary(*args, **kwargs):  # imported by ModernBERT, never used here\n    raise NotImplementedError\n"
    )
    # imported (not used here) by transformers' ModernBERT, which their hypernet.py imports
    (pkg / "flash_attn_interface.py").write_text(
        "from . import flash_attn_func, flash_attn_varlen_func\n\n\n"
        "def flash_attn_varlen_qkvpacked_func(*args, **kwargs):\n    raise NotImplementedError\n"
    )
    (pkg / "layers" / "rotary.py").write_text(
        "def apply_rotary_emb(*args, **kwargs):\n    raise NotImplementedError\n\n\n"
        "class RotaryEmbedding:  # imported by ModernBERT, never used here\n    pass\n"
    )
    dist = root / "flash_attn-2.7.4.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.7.4\n")
    (dist / "RECORD").write_text("")
    sys.path.insert(0, str(root))

    import transformers.utils as tu
    import transformers.utils.import_utils as iu

    def available() -> bool:  # flash-attn "needs CUDA"; the stand-in does not
        return True

    iu.is_flash_attn_2_available = available
    tu.is_flash_attn_2_available = available
    import transformers.modeling_utils as mu

    mu.is_flash_attn_2_available = available
