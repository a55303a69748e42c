"""Largest |ours - theirs| over every generated A/B in the Sakana fixtures (numbers in docs/sakana.md).

HF_HUB_OFFLINE=1 .venv/bin/python research/sakana_fixtures/max_diff.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    torch.set_num_threads(1)
    from sakana_support import FIXTURES, expected, gunzip_checkpoint, t2l_run
    from test_sakana_d2l import D2L_BASES
    from test_sakana_t2l import T2L_BASES, their_lora

    from hyperlora_integrations import HyperLoRAModel
    from hyperlora_integrations.hypernets.sakana_import import import_d2l, import_t2l

    tmp = Path(tempfile.mkdtemp())
    for fam, name in D2L_BASES.items():
        want, meta = expected(fam)
        base = FIXTURES / fam / name
        out = import_d2l(gunzip_checkpoint(fam, tmp / fam).parent, tmp / fam / "d2l", base_config=base)
        model = HyperLoRAModel.from_pretrained(base, d2l=out, t2l=None)
        diffs = {}
        for case in ("single", "chunked"):
            if case == "chunked":
                model.d2l.config = model.d2l.config.model_copy(update={"chunk_len": meta["chunk_len"]})
                adapter = model.d2l.internalize(model, meta["document"], bias_scaler=meta["bias_scaler"])
            else:
                adapter = model.internalize(meta["document"])
            diffs[case] = max(
                max(
                    (adapter.A[m] - want[f"{case}.A.{m}"]).abs().max().item(),
                    (adapter.B[m].transpose(1, 2) - want[f"{case}.B.{m}"]).abs().max().item(),
                )
                for m in adapter.A
            )
        size = max(want[f"single.B.{m}"].abs().max().item() for m in model.d2l.modules_order)
        print(f"D2L {fam}: max|diff| single {diffs['single']:.2e}, chunked {diffs['chunked']:.2e} (max|B| {size:.2f})")
    for fam, name in T2L_BASES.items():
        want, meta = expected(fam, "t2l")
        base = FIXTURES / fam / name
        for variant, info in meta["variants"].items():
            run = t2l_run(fam, info["dir"], tmp / fam)
            out = import_t2l(run, tmp / fam / f"t2l-{variant}", base_config=base, module_order=info["module_order"])
            model = HyperLoRAModel.from_pretrained(base, d2l=None, t2l=out)
            adapter = model.generate_skill(meta["description"])
            theirs = their_lora(want, f"{variant}.text.")
            diff = max((getattr(adapter, ab)[m] - theirs[(m, ab)]).abs().max().item() for m in adapter.A for ab in "AB")
            print(f"T2L {fam} {variant}: max|diff| {diff:.2e}")


if __name__ == "__main__":
    main()
