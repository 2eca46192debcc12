"""Artifact manifest v1: everything needed to trust, describe and apply a payload.

The manifest is JSON (pydantic); tensors live in safetensors files listed in `files` with
their sha256. The registry stores the manifest itself content-addressed, so its digest
identifies an artifact version across registries.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
# fields added to v1 after its first release, with the defaults that mean "not used" (to_bytes)
ADDED_FIELDS = {"task": {"scheme": None},
                "head": {"projection": None, "activation": "identity", "normalize": False, "dimensions": []}}
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman", "entity_f1", "token_accuracy")
# What a task returns: a label, a value, a vector, a pair's relevance score (a cross-encoder),
# or a label per word piece (named entities: token classification).
TASK_TYPES = ("classification", "regression", "embedding", "reranking", "token_classification")


def check_iob2(labels: list[str]) -> None:
    """IOB2 label names: `O` and `B-`/`I-` prefixed types, each type with both."""
    if "O" not in labels:
        raise ValueError("IOB2 labels need an 'O' (outside) label")
    malformed = [label for label in labels if label != "O" and (label[:2] not in ("B-", "I-") or not label[2:])]
    if malformed:
        raise ValueError(f"IOB2 labels are O, B-TYPE and I-TYPE; not {', '.join(malformed[:3])}")
    kinds = sorted({label[2:] for label in labels if label != "O"})
    missing = [f"{p}-{k}" for k in kinds for p in "BI" if f"{p}-{k}" not in labels]
    if missing:
        raise ValueError(f"IOB2 labels lack {', '.join(missing[:3])}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """A supervised text task: what it returns, which fields hold the text, what the labels
    mean, how it is scored. An embedding task's pair field and labels are its training data
    (pairs with a similarity score, or positive pairs); it embeds one text at a time."""

    name: str
    type: Literal[TASK_TYPES] = Field(description="classification | regression | embedding | reranking | "  # type: ignore[valid-type]
                                      "token_classification; manifests without it are classification (labels) or "
                                      "regression")
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
    scheme: Literal["IOB2"] | None = Field(None, description="token_classification: how its labels mark entities")

    @model_validator(mode="before")
    @classmethod
    def _type_of_older_manifests(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") is None:
            data = {**data, "type": "classification" if data.get("labels") else "regression"}
        return data

    @model_validator(mode="after")
    def _labels_fit_the_type(self) -> TaskSpec:
        labelled = self.type in ("classification", "token_classification")
        if labelled != bool(self.labels):
            raise ValueError(f"a {self.type} task {'needs' if labelled else 'takes no'} label names")
        if (self.type == "token_classification") != (self.scheme is not None):
            raise ValueError("a token_classification task (and only it) names its tagging scheme (IOB2)")
        if self.scheme == "IOB2":
            check_iob2(self.labels)
        if self.type in ("embedding", "reranking") and not self.text_pair_field:
            raise ValueError(f"an {self.type} task trains on text pairs: it needs text_pair_field")
        return self

    @property
    def is_regression(self) -> bool:
        """Whether its labels are numbers (embedding, reranking and regression tasks)."""
        return not self.labels

    @property
    def takes_pairs(self) -> bool:
        """Whether a request's inputs are text pairs (an embedding task embeds single texts)."""
        return self.text_pair_field is not None and self.type != "embedding"

    @property
    def num_outputs(self) -> int:
        return len(self.labels) or 1


class HeadConfig(_Strict):
    """The task head on top of the encoder: pooling of token states, then for a label, value or
    score optionally a dense layer with tanh (`dense`: the heads of Hugging Face's BERT and
    RoBERTa sequence classifiers, which pool the first token), dropout + linear; for an
    embedding optionally a projection (sentence-transformers' `Dense`) and L2 normalisation."""

    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    dense: bool = False
    projection: int | None = Field(None, gt=0, description="embedding: output width of a linear projection")
    activation: Literal["identity", "tanh"] = Field("identity", description="embedding: after the projection")
    normalize: bool = Field(False, description="embedding: unit length (cosine similarity = dot product)")
    dimensions: list[int] = Field(default_factory=list, description="embedding: smaller widths its leading "
                                  "dimensions keep meaning at (trained with a Matryoshka loss); requests may ask for them")


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
        """The stored form. Fields added to v1 since its first release are written only when they
        say something (a task's type where its labels do not imply it, a tagging scheme, an
        embedding head's settings): the manifest of a classifier or a regression stays what
        every earlier ticketserve reads, so replicas of two releases share one registry."""
        exclude: dict[str, set[str]] = {part: {name for name, default in fields.items()
                                               if getattr(getattr(self, part), name) == default}
                                        for part, fields in ADDED_FIELDS.items()}
        if self.task.type == ("classification" if self.task.labels else "regression"):
            exclude["task"].add("type")
        return self.model_dump_json(indent=2, exclude=exclude).encode()
