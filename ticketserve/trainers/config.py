"""Settings of one training run, shared by every method."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(32, gt=0, description="examples per step and process")
    eval_batch_size: int = Field(128, gt=0)
    lr: float | None = Field(None, gt=0, description="peak learning rate; default: the method's")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of steps with linear warm-up")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(128, gt=8, description="tokens per example (longer are truncated)")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps; default: every epoch")
    patience: int | None = Field(None, gt=0, description="stop after N evaluations without improvement")
    seed: int = 42
    train_samples: int | None = Field(None, gt=0, description="random subset of the training split")
    eval_samples: int | None = Field(None, gt=0, description="random subset of the evaluation split")
    task_type: Literal["embedding", "reranking"] | None = Field(
        None, description="train a pair task as an embedding task (each text embedded apart; scored by the Spearman "
                          "correlation of the pairs' cosine similarity) or a reranker (one relevance score per pair)")
    loss: Literal["cosent", "cosine", "mnrl"] | None = Field(
        None, description="embedding tasks: cosent (scored pairs; the default), cosine (squared error of the cosine "
                          "against labels scaled into [0, 1]), mnrl (positive pairs — the rows with the highest label — "
                          "against in-batch negatives)")
    matryoshka_dims: list[int] = Field(
        default_factory=list, description="embedding tasks: leading widths to train as well (Matryoshka: the loss "
                                          "summed over the full width and each of these); requests may ask for them "
                                          "with `dimensions`")
    pooling: Literal["mean", "cls"] = "mean"
    head_dropout: float = Field(0.1, ge=0, lt=1)
    log_every: int = Field(10, gt=0, description="steps per point of the train-loss curve")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="mixed precision through accelerate: bf16 on CUDA (Ampere+) or a CPU with bfloat16, "
                            "fp16 on CUDA; master weights, optimizer state and the artifact stay float32")

    @model_validator(mode="after")
    def _eval_within_run(self) -> TrainConfig:
        if self.max_steps and self.eval_steps and self.eval_steps > self.max_steps:
            raise ValueError("eval_steps exceeds max_steps: no evaluation would run")
        return self
