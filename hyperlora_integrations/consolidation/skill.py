"""``consolidate_skill``: learn a task description (and/or examples) into a skill adapter.

The one-pass Text-to-LoRA adapter is a generic "answer tersely" adapter: measured (issue 22,
docs/text-to-lora.md) nothing of the description reaches it. Document consolidation learns a text
into an adapter by gradient steps; a skill is consolidated the same way with a different kind of
context: the targets are what the model does *with the description in its prompt* (the teacher,
optionally wearing the instant skill too), and the student is the adapter with no description.
Few-shot ``examples`` add gold rows. Same adapter shape, initialisation and step as documents
(``distill.fit_soft`` reuses ``trainer``'s); warm-started from the instant adapter where a
Text-to-LoRA hypernetwork exists, from zero otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import check_text
from ..errors import InvalidInputError
from ..lora import Adapter, AdapterMetadata
from .config import ConsolidationConfig
from .distill import fit_soft
from .skill_targets import (
    SoftSequence,
    example_sequences,
    pool_inputs,
    ranked_inputs,
    teacher_sequences,
    written_inputs,
)

if TYPE_CHECKING:
    from ..model import HyperLoRAModel


def _default_training() -> ConsolidationConfig:
    return ConsolidationConfig(steps=40, batch_size=8, lr=3e-3, max_seq_tokens=128)


class SkillConsolidationConfig(BaseModel):
    """Where the inputs come from, what the teacher is, and the training recipe (``training``)."""

    model_config = ConfigDict(extra="forbid")

    training: ConsolidationConfig = Field(default_factory=_default_training)
    pools: dict[str, int] = Field(
        default_factory=dict, description="inputs drawn at random from each generic pool (skill_targets.POOLS)"
    )
    ranked: int = Field(
        40,
        ge=0,
        le=1024,
        description="inputs shared out between the pools by the model's own sense of the task's input",
    )
    written: int = Field(0, ge=0, le=256, description="inputs the model writes for the description")
    teacher_instant: bool = Field(False, description="the teacher also wears the instant skill adapter")
    teacher_format: bool = Field(True, description="the teacher answers in the demonstration frame")
    top_k: int = Field(20, ge=1, le=1000, description="teacher probabilities kept per position")
    temperature: float = Field(
        1.0, gt=0, le=10, description="the teacher's distribution is softmax(logits / temperature): < 1 sharpens it"
    )
    max_new_tokens: int = Field(16, ge=1, le=256, description="longest teacher answer")
    example_weight: float = Field(1.0, ge=0, description="weight of a gold example row against a teacher row")


def _checked_config(config: SkillConsolidationConfig | None, steps: int | None) -> SkillConsolidationConfig:
    if config is not None and not isinstance(config, SkillConsolidationConfig):
        raise InvalidInputError(f"config must be a SkillConsolidationConfig, got {type(config).__name__}")
    config = config or SkillConsolidationConfig()
    if steps is not None:
        try:
            training = ConsolidationConfig.model_validate({**config.training.model_dump(), "steps": steps})
        except ValidationError as exc:
            raise InvalidInputError(f"steps={steps!r}: {exc.errors()[0]['msg']}") from None
        config = config.model_copy(update={"training": training})
    return config


def _checked_examples(examples: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    out = []
    for pair in examples or ():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InvalidInputError("examples= takes (input, output) string pairs")
        if not pair[0].strip() or not pair[1].strip():
            raise InvalidInputError("an example's input and output must be non-empty")
        out.append((pair[0], pair[1]))
    return out


def _within(row: SoftSequence, limit: int) -> SoftSequence:
    """A row cut to ``limit`` tokens: the target to half of it, the prompt from the left (as
    document consolidation cuts its turns), so one long example cannot blow up a batch."""
    if len(row.prompt) + len(row.target) <= limit:
        return row
    n = min(len(row.target), limit // 2)
    return SoftSequence(row.prompt[-(limit - n) :], row.target[:n], row.top_ids[:n], row.top_probs[:n], row.weight)


def consolidate_skill(
    model: HyperLoRAModel,
    description: str,
    instant: Adapter | None = None,
    *,
    examples: Sequence[tuple[str, str]] | None = None,
    distill: bool = True,
    config: SkillConsolidationConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
    exclude_inputs: Sequence[str] = (),
    time_budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Adapter:
    """A skill adapter trained from ``instant`` (or zero) on the description and/or examples.

    ``distill``: learn what the model does with the description in its prompt (KL to its
    distribution); ``examples``: also (or only, with ``distill=False``) fit the gold outputs.
    ``exclude_inputs`` keeps given inputs (an evaluation's questions) out of the training inputs.
    """
    started = time.perf_counter()
    check_text(description, "skill description")
    if not description.strip():
        raise InvalidInputError("a skill needs a non-empty description")
    config = _checked_config(config, steps)
    pairs = _checked_examples(examples)
    if not distill and not pairs:
        raise InvalidInputError("nothing to learn: pass examples=, or distil the description")
    if instant is not None:
        instant = model._checked([instant])[0]
    rows = []
    n_inputs = 0
    if distill:
        excluded = [*exclude_inputs, *(given for given, _ in pairs)]
        inputs = [given for given, _ in pairs]
        inputs += pool_inputs(model, config.pools, seed, exclude=excluded)
        inputs += ranked_inputs(model, description, config.ranked, seed, exclude=[*excluded, *inputs])
        inputs += written_inputs(model, description, config.written, seed, exclude=[*excluded, *inputs])
        n_inputs = len(inputs)
        teacher = [instant] if (instant is not None and config.teacher_instant) else []
        rows += teacher_sequences(
            model,
            description,
            inputs,
            adapters=teacher,
            max_new_tokens=config.max_new_tokens,
            top_k=config.top_k,
            temperature=config.temperature,
            formatted=config.teacher_format,
        )
    rows += example_sequences(model, pairs, config.example_weight)
    rows = [_within(row, config.training.max_seq_tokens) for row in rows]
    targets_seconds = time.perf_counter() - started
    result = fit_soft(
        model,
        rows,
        config.training,
        init=instant,
        seed=seed,
        time_budget_s=time_budget_s,
        progress=progress,
        should_stop=should_stop,
    )
    meta = AdapterMetadata.for_skill(
        description,
        base_model=model.name,
        base_fingerprint=model.fingerprint,
        source="consolidate_skill",
        consolidated=True,
        consolidation={
            "steps": result.steps,
            "seconds": round(result.seconds, 3),
            "targets_seconds": round(targets_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "loss_first": round(result.losses[0], 4),
            "loss_last": round(sum(result.losses[-5:]) / len(result.losses[-5:]), 4),
            "stopped": result.stopped,
            "init": "instant" if instant is not None else "zero",
            "distilled_inputs": n_inputs,
            "examples": len(pairs),
            "seed": seed,
            "config": config.model_dump(mode="json"),
        },
    )
    return Adapter(result.A, result.B, metadata=meta)
