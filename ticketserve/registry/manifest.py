"""Artifact manifest v1: everything needed to trust, describe and apply a payload.

The manifest is JSON (pydantic); tensors live in safetensors files listed in `files` with
their sha256. The registry stores the manifest itself content-addressed, so its digest
identifies an artifact version across registries.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """A supervised text task: which fields hold the text, what the labels mean, how it is scored."""

    name: str
    text_field: str
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list[str] = Field(default_factory=list, description="label names; empty = regression")
    metric: Literal[METRICS] = Field(description="primary metric: selects the best checkpoint")  # type: ignore[valid-type]
    extra_metrics: list[Literal[METRICS]] = Field(default_factory=list)  # type: ignore[valid-type]
    hub_dataset: str | None = Field(None, description="datasets hub id, e.g. nyu-mll/glue")
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_outputs(self) -> int:
        return len(self.labels) or 1


class HeadConfig(_Strict):
    """The task head on top of the encoder: pooling of token states, optionally a dense layer
    with tanh (`dense`: the heads of Hugging Face's BERT and RoBERTa sequence classifiers,
    which pool the first token), then dropout + linear."""

    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    dense: bool = False


class BackboneRef(_Strict):
    """The exact backbone an artifact was trained on; `fingerprint` is a content hash."""

    name: str
    fingerprint: str
    model_type: str
    num_layers: int
    hidden_size: int


class FileEntry(_Strict):
    sha256: str
    bytes: int

    @classmethod
    def of(cls, data: bytes) -> FileEntry:
        return cls(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    kind: str = Field(description="artifact kind: row_delta, full, ... (decides how it is applied)")
    method: str = Field(description="trainer that produced it")
    task: TaskSpec
    head: HeadConfig
    backbone: BackboneRef
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = Field(default_factory=dict)
    trainable_params: int = 0
    payload_bytes: int = 0
    files: dict[str, FileEntry] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict, description="kind-specific facts")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ticketserve_version: str = ""

    @field_validator("files")
    @classmethod
    def _plain_file_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"file name {name!r} must be a plain file name")
        return files

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()
