"""``MemoryConfig``: how much of a conversation stays text, and how the rest is learned.

A conversation's prompt cost grows with every turn. The memory keeps only the most recent turns
as text (``recent_tokens``); turns that fall out of that window are learned into the
namespace's memory adapter by consolidation (gradient steps, in the background), a few hundred
tokens per job, each job warm-started from the adapter the previous one left.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..consolidation import ConsolidationConfig


class MemoryConfig(BaseModel):
    """Budgets and consolidation settings of a conversation memory.

    - ``recent_tokens``: the recent-turn budget. The newest turns whose tokens (content plus the
      chat template's role markers, under the base model's tokenizer) fit in it stay in the
      prompt as text; the latest message always stays, even when it alone is over budget, so the
      question being asked is never consolidated away from under it.
    - ``job_tokens``: new turns learned per consolidation job. Jobs are kept to one
      consolidation chunk because the engine starts every chunk of a longer text from zero,
      which would throw away the warm start (what the memory learned before).
    - ``min_job_tokens``: a job is queued once turns outside the window add up to this many
      tokens (``consolidate_now`` queues whatever there is). Without it every message that leaves
      the window would make its own job, each costing a full consolidation (about a minute on
      the default model); the price is that up to this many tokens wait as text.
    - ``replay_tokens``: previously consolidated turns learned again in each job, so a job that
      fits new turns does not overwrite old ones. Measured on the tiny model (docs/memory.md,
      "Replay"); 0 turns it off.
    - ``rank`` / ``max_bytes``: the memory adapter's rank and byte budget (a warm-started job
      keeps the rank of the adapter it starts from; the engine cuts the rank by truncated SVD
      when the adapter is over ``max_bytes``).
    - ``consolidation``: the recipe (steps, learning rate, objective mix); ``None`` takes the
      model's ``consolidation_config``, else the measured default. ``rank`` and ``max_bytes``
      here override the recipe's own.
    - ``background``: start the store's background worker when a job is queued; ``False``
      leaves the queue to ``consolidate_now()``, ``hyperlora drain`` or another process.
    """

    model_config = ConfigDict(extra="forbid")

    recent_tokens: int = Field(512, ge=16, le=131_072)
    job_tokens: int = Field(384, ge=16, le=8192)
    min_job_tokens: int = Field(192, ge=1, le=8192)
    replay_tokens: int = Field(128, ge=0, le=8192)
    rank: int = Field(8, ge=1, le=256)
    max_bytes: int = Field(8 * 2**20, ge=1024)
    consolidation: ConsolidationConfig | None = None
    background: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _batches_fit(self) -> MemoryConfig:
        if self.min_job_tokens > self.job_tokens:
            raise ValueError(f"min_job_tokens ({self.min_job_tokens}) is over job_tokens ({self.job_tokens})")
        return self

    def recipe(self, model_default: ConsolidationConfig | None) -> ConsolidationConfig:
        """The consolidation config a memory job runs with.

        ``chunk_tokens`` is raised to its maximum so one job's text is never split into chunks
        (a chunk starts from zero: the warm start, and so everything learned before, would be
        lost); ``job_tokens`` keeps the text short instead.
        """
        base = self.consolidation or model_default or ConsolidationConfig()
        return ConsolidationConfig.model_validate(
            {**base.model_dump(), "rank": self.rank, "max_bytes": self.max_bytes, "chunk_tokens": 8192}
        )
