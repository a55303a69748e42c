"""``ServeConfig``: everything ``hyperlora serve`` deploys, validated before Ray starts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..adapters.store import check_name
from .spec import ModelSpec


class ServeConfig(BaseModel):
    """Model, store and Ray Serve sizing of one OpenAI-compatible application.

    ``store`` is a directory every server replica opens; replicas on one machine share it safely
    (one SQLite writer at a time under a file lock). Replicas on several machines must all run
    where that directory is: give that node a custom resource and name it in ``store_resource``
    (docs/serving.md, "Ray cluster").
    """

    model_config = ConfigDict(extra="forbid")

    store: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    namespaces: list[str] = Field(default_factory=lambda: ["default", "skills"], min_length=1)
    """``namespaces[0]`` receives ``POST /v1/documents``; adapters of all of them are ``model`` values."""
    served_model_name: str | None = None
    """The base model's ``model`` value (default: the loaded model's name)."""
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(8, ge=1)
    """Requests in flight per replica; with ``batching`` also the largest decoding batch."""
    batching: bool = True
    """Decode a replica's concurrent requests as one batch (each row with its own adapters);
    ``False``: one token loop per request, in threads."""
    max_adapters_per_replica: int = Field(16, ge=1)
    """Size of each replica's LRU of loaded adapters (Ray Serve model multiplexing)."""
    replica_num_cpus: float = Field(1.0, ge=0)
    ingress_num_cpus: float = Field(0.0, ge=0)
    store_resource: str | None = None
    """A custom Ray resource held by the node with the store; server replicas are placed there."""
    default_max_tokens: int = Field(256, ge=1)
    default_temperature: float = Field(0.0, ge=0, le=2)
    """Used when a request has no ``temperature`` (OpenAI's default is 1.0; ours is greedy)."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    select_adapters: bool = True
    """Of several adapters activated by signed references, keep those that make the user's
    message more likely (as ``ChatHyperLoRA``); ``False`` activates every verified reference."""
    max_request_bytes: int = Field(8 * 2**20, ge=1024)

    @field_validator("namespaces")
    @classmethod
    def _names(cls, namespaces: list[str]) -> list[str]:
        return [check_name(ns, "namespace") for ns in namespaces]
