"""The skill teacher's decoding: the shared prompt start prefilled once vs plain left padding (a probe).

Decodes the teacher's answers for one skill's 40 default inputs both ways in one process and
prints the seconds of each and whether tokens and probabilities agree. The benchmark
(`hyperlora bench --skill-consolidate 3`) is where the consolidated skill's time is measured.

    python -m research.probe_teacher_speed --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hyperlora_integrations import HyperLoRAModel
from hyperlora_integrations.consolidation import skill_targets as st
from hyperlora_integrations.consolidation.skill import SkillConsolidationConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--description", default="Write the opposite of the given English adjective.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = HyperLoRAModel.from_pretrained()
    inputs = st.ranked_inputs(model, args.description, SkillConsolidationConfig().ranked, 0)
    prompts = [st.teacher_prompt(model, args.description, x, True) for x in inputs]
    st.decode_batch(model, prompts[:2], max_new_tokens=2)  # warm-up
    shared_min = st.MIN_SHARED_PREFIX
    runs = {}
    for name, minimum, rows in (("left_padded_16", 10**9, 16), ("shared_prefix_64", shared_min, 64)):
        st.MIN_SHARED_PREFIX = minimum
        t0 = time.perf_counter()
        runs[name] = st.decode_batch(model, prompts, rows_per_batch=rows)
        print(name, json.dumps({"seconds": round(time.perf_counter() - t0, 2), "inputs": len(prompts)}), flush=True)
    st.MIN_SHARED_PREFIX = shared_min
    a, b = runs["left_padded_16"], runs["shared_prefix_64"]
    same = sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
    diff = max((x[2] - y[2]).abs().max().item() for x, y in zip(a, b, strict=True) if x[0] == y[0])
    print(json.dumps({"same_tokens": f"{same}/{len(a)}", "max_logit_diff": diff, "shared": st._shared_prefix(prompts)}))


if __name__ == "__main__":
    main()
