"""The training loop every method shares, on `accelerate` (one process, or many with
`accelerate launch` / `torchrun`: DDP over gloo on CPU, NCCL on GPUs).

AdamW over the parameters the method makes trainable, linear warm-up and decay, gradient
clipping, length-grouped batches with dynamic padding, evaluation every epoch or N steps,
early stopping, and the best evaluation's trainable weights restored at the end.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, get_linear_schedule_with_warmup

from ticketserve.core.errors import InvalidArgument
from ticketserve.core.model import PAIR, TaskModel, predictions
from ticketserve.core.tagging import IGNORED, joined, piece_labels, word_ids
from ticketserve.core.tasks import compute_metrics
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.progress import RunProgress

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# an embedding task's batches hold both texts of each pair, embedded apart: the second as pair_…
MODEL_INPUTS = (*TOKEN_INPUTS, *(PAIR + name for name in TOKEN_INPUTS))


class TrainingHooks(Protocol):
    """What the loop asks of a method (trainers/single.py `ArtifactMethod`)."""

    def penalty(self, model: TaskModel) -> torch.Tensor | None: ...

    def weight_decay(self, param: nn.Parameter) -> bool: ...

    def learning_rate(self, param: nn.Parameter, lr: float) -> float: ...


def accelerator_for(config: TrainConfig, **kwargs) -> Accelerator:
    """The run's accelerator: the GPU (or MPS/XPU) when there is one, else multi-process CPU;
    in the run's mixed precision, refused up front where the device cannot run it."""
    has_device = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    check_precision(config.precision, cuda=torch.cuda.is_available())
    mixed = {"fp32": "no"}.get(config.precision, config.precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # accelerate keeps one precision per process; a later run in another (same process:
        # a notebook, a study, the tests) starts a fresh state, the process group untouched
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not has_device, mixed_precision=mixed, **kwargs)  # cpu=True enables multi-process CPU


def check_precision(precision: str, cuda: bool) -> None:
    """fp16 autocast needs CUDA (its loss scaler is CUDA's); bf16 needs Ampere+ or a CPU with
    native bfloat16 (elsewhere it runs, emulated, slower than fp32 — refused as a mistake)."""
    if precision == "fp16" and not cuda:
        raise InvalidArgument("--precision fp16 needs a CUDA device; on CPU use --precision bf16")
    if precision == "bf16" and not (torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()):
        raise InvalidArgument("--precision bf16: this device has no native bfloat16 (CUDA before Ampere, or a CPU "
                              "without AVX-512 BF16 / AMX); train in fp32")


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively here (AVX-512 BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def adamw(groups: Iterable[tuple[list[nn.Parameter], float, bool]], config: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over (parameters, peak rate, decayed?) groups, with the run's weight decay."""
    return torch.optim.AdamW([{"params": params, "lr": group_lr, "weight_decay": config.weight_decay if decay else 0.0}
                              for params, group_lr, decay in groups], lr=lr)


def linear_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int):
    """Linear warm-up over the run's warm-up share of `total` steps, then linear decay to 0."""
    return get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)


def scores(forward: Callable[[dict], torch.Tensor], loader, spec, accelerator: Accelerator) -> dict[str, float]:
    """The task's metrics of `forward` (batch → logits) over a prepared evaluation loader."""
    preds, refs = [], []
    tagged = spec.type == "token_classification"
    with torch.no_grad():
        for batch in loader:
            logits = forward({k: batch[k] for k in MODEL_INPUTS if k in batch})
            found, labels = predictions(spec, logits), batch["labels"]
            if tagged:  # sentences of different lengths across processes: padded alike before gathering
                found = accelerator.pad_across_processes(found, dim=1, pad_index=IGNORED)
                labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORED)
            p, r = accelerator.gather_for_metrics((found, labels))
            if tagged:  # each sentence's labelled pieces (its words)
                kept = r != IGNORED
                preds += [row[mask].cpu().numpy() for row, mask in zip(p, kept)]
                refs += [row[mask].cpu().numpy() for row, mask in zip(r, kept)]
                continue
            preds.append(p.float().cpu().numpy())
            refs.append(r.float().cpu().numpy())
    if tagged:
        return compute_metrics(spec, preds, refs)
    return compute_metrics(spec, np.concatenate(preds), np.concatenate(refs))


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length (less padding), in random order that changes every epoch:
    shuffle, cut into mega-batches of 50 batches, sort each by length, split, shuffle batches."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * 50
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


@dataclass
class FitResult:
    metrics: dict[str, float]
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    steps: int = 0
    best_step: int = 0
    train_seconds: float = 0.0
    optimizer_state_bytes: int = 0
    evaluate: Callable[[], dict[str, float]] | None = None  # scores the model as it is now
    train_loader: object = None  # the prepared training batches (e.g. for importance scores)


def tokenize(dataset, tokenizer, max_length: int, apart: bool = False):
    """Token ids + `labels` + `length` columns; the text columns are dropped. `apart`: the two
    texts of a pair tokenized each alone (an embedding task's), the second as `pair_…` columns.
    Rows of words (token classification) are joined by spaces and tokenized as serving tokenizes
    a text; each word's label goes on its first piece, the others are ignored."""
    has_pair = "text_pair" in dataset.column_names
    words = bool(len(dataset)) and isinstance(dataset[0]["text"], list)

    def encode(batch):
        if words:
            texts, spans = zip(*(joined(row) for row in batch["text"]))
            encoded = tokenizer(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True)
            encoded["label"] = [piece_labels(word_ids(offsets, row_spans), labels) for offsets, row_spans, labels
                                in zip(encoded.pop("offset_mapping"), spans, batch["label"])]
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded
        if apart:
            encoded = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
            second = tokenizer(batch["text_pair"], truncation=True, max_length=max_length)
            encoded |= {PAIR + key: value for key, value in second.items()}
            encoded["length"] = [max(len(a), len(b)) for a, b in zip(encoded["input_ids"], second["input_ids"])]
            return encoded
        encoded = tokenizer(batch["text"], batch["text_pair"] if has_pair else None,
                            truncation=True, max_length=max_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    text_columns = [c for c in ("text", "text_pair") if c in dataset.column_names]
    return dataset.map(encode, batched=True, remove_columns=text_columns).rename_column("label", "labels")


def _columns(dataset) -> list[str]:
    return [c for c in (*MODEL_INPUTS, "labels") if c in dataset.column_names]


class PaddedBatches:
    """Pads a batch's token columns to its longest text, each text of a pair apart when the
    batch holds `pair_…` columns (the collator of `transformers` pads one set)."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorWithPadding(tokenizer)
        self.pad_labelled = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORED)

    def __call__(self, features: list[dict]) -> dict:
        if isinstance(features[0].get("labels"), list):  # a label per piece: padded with IGNORED
            return self.pad_labelled(features)
        if PAIR + "input_ids" not in features[0]:
            return self.pad(features)
        first = self.pad([{k: v for k, v in f.items() if not k.startswith(PAIR)} for f in features])
        second = self.pad([{k.removeprefix(PAIR): v for k, v in f.items() if k.startswith(PAIR)} for f in features])
        return dict(first) | {PAIR + k: v for k, v in second.items()}


def training_batches(train_ds, tokenizer, config: TrainConfig) -> DataLoader:
    """The training data in length-grouped batches, padded per batch (`batch_sampler.set_epoch`
    reshuffles them)."""
    sampler = LengthGroupedBatches(list(train_ds["length"]), config.batch_size, config.seed)
    return DataLoader(train_ds.select_columns(_columns(train_ds)), batch_sampler=sampler,
                      collate_fn=PaddedBatches(tokenizer))


def evaluation_batches(eval_ds, tokenizer, config: TrainConfig) -> DataLoader:
    """The evaluation data sorted by length (least padding), padded per batch."""
    with warnings.catch_warnings():  # pyarrow deprecation inside datasets' sort
        warnings.simplefilter("ignore", FutureWarning)
        eval_sorted = eval_ds.sort("length").select_columns(_columns(eval_ds))
    return DataLoader(eval_sorted, batch_size=config.eval_batch_size, collate_fn=PaddedBatches(tokenizer))


def fit(accelerator: Accelerator, model: TaskModel, method: TrainingHooks, params: list[nn.Parameter], train_ds, eval_ds,
        tokenizer, config: TrainConfig, lr: float, show_progress: bool = True, label: str | None = None) -> FitResult:
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise InvalidArgument(f"{model.spec.name}: empty training or evaluation data")
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    train_loader = training_batches(train_ds, tokenizer, config)
    sampler = train_loader.batch_sampler
    eval_loader = evaluation_batches(eval_ds, tokenizer, config)

    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((method.weight_decay(p), method.learning_rate(p, lr)), []).append(p)
    optimizer = adamw([(group, group_lr, decay) for (decay, group_lr), group in groups.items()], config, lr)
    spec = model.spec
    wrapped, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = len(train_loader)
    total = config.max_steps or steps_per_epoch * config.epochs
    scheduler = linear_schedule(optimizer, config, total)

    def evaluate() -> dict[str, float]:
        wrapped.eval()
        metrics = scores(lambda inputs: wrapped(**inputs), eval_loader, spec, accelerator)
        wrapped.train()
        return metrics

    result = FitResult(metrics={}, curves={"train_loss": [], "eval": []}, evaluate=evaluate, train_loader=train_loader)
    best_score, best_state, stale = -math.inf, None, 0
    started = time.perf_counter()
    step, running, running_n = 0, 0.0, 0
    wrapped.train()
    with RunProgress(label or f"train {spec.name}", total, show_progress and accelerator.is_main_process) as progress:
        for epoch in range(math.ceil(total / steps_per_epoch)):
            sampler.set_epoch(epoch)
            for batch_index, batch in enumerate(train_loader):
                logits = wrapped(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
                loss = model.loss(logits, batch["labels"])
                extra = method.penalty(model)
                accelerator.backward(loss if extra is None else loss + extra)
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.advance(loss.item())
                running += loss.item()
                running_n += 1
                if step % config.log_every == 0:
                    result.curves["train_loss"].append({"step": step, "loss": running / running_n})
                    running, running_n = 0.0, 0
                end_of_epoch = batch_index == steps_per_epoch - 1
                due = (step % config.eval_steps == 0) if config.eval_steps else end_of_epoch
                if due or step == total:
                    metrics = evaluate()
                    result.curves["eval"].append({"step": step, "epoch": epoch + (batch_index + 1) / steps_per_epoch, **metrics})
                    score = metrics[spec.metric]
                    if score > best_score:
                        best_score, stale = score, 0
                        best_state = [p.detach().clone() for p in params]
                        result.best_step, result.metrics = step, metrics
                    else:
                        stale += 1
                    progress.evaluated(f"loss {loss.item():.4f}, {spec.metric} {score:.4f} (best {best_score:.4f})")
                if step == total or (config.patience and stale >= config.patience):
                    break
            else:
                continue
            break
    if best_state is not None:
        with torch.no_grad():
            for p, best in zip(params, best_state):
                p.copy_(best)
    result.steps, result.train_seconds = step, time.perf_counter() - started
    result.optimizer_state_bytes = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    return result
