"""Ticket-Share (Liang et al.; DESIGN.md §3): one encoder trained on several tasks at once,
each batch from one task and run with that task's super-ticket gates. A structure kept by
several tasks is updated by all of them, one kept by one task only by that task, one kept
by none never. Strict sharing: a structure masked for a task gets no update from it — not
through the gradient (zero anyway), nor through AdamW's momentum or weight decay.

Plain multi-task learning is the same loop with every gate open. The result is published as
a `backbone` entry (the shared encoder) plus one `structure_mask` artifact per task.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from registry import ArtifactVersion, BackboneRef, HeadConfig, Manifest, Store, TaskSpec
from ticketserve import artifact
from ticketserve.backbone import Backbone, encoder_layers, fingerprint
from ticketserve.data import load_split
from ticketserve.kinds import gates
from ticketserve.kinds.routing import Routing, route
from ticketserve.kinds.structure_mask import to_tensors
from ticketserve.model import TaskHead, encode, predictions
from ticketserve.tasks import compute_metrics
from trainers.config import TrainConfig
from trainers.loop import MODEL_INPUTS, LengthGroupedBatches, tokenize

Mask = tuple[torch.Tensor, torch.Tensor]  # keep heads (L, H), keep FFN (L,)


def masked_slices(encoder: nn.Module, mask: Mask) -> list[tuple[nn.Parameter, tuple]]:
    """The parameter slices that belong to structures a mask switches off."""
    keep_heads, keep_ffn = mask
    width = encoder.config.hidden_size // encoder.config.num_attention_heads
    slices = []
    for index, layer in enumerate(encoder_layers(encoder)):
        attention = layer.attention
        for head in (~keep_heads[index]).nonzero().flatten().tolist():
            rows = slice(head * width, (head + 1) * width)
            for linear in (attention.self.query, attention.self.key, attention.self.value):
                slices += [(linear.weight, (rows, slice(None))), (linear.bias, (rows,))]
            slices.append((attention.output.dense.weight, (slice(None), rows)))
        if not keep_ffn[index]:
            for linear in (layer.intermediate.dense, layer.output.dense):
                slices += [(linear.weight, (slice(None),)), (linear.bias, (slice(None),))]
    return slices


class StrictSharing:
    """Wraps an optimizer step so a task's masked slices keep their values and optimizer
    state: bit-identical after a step on that task."""

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, optimizer: torch.optim.Optimizer, slices: dict[str, list[tuple[nn.Parameter, tuple]]]):
        self.optimizer, self.slices = optimizer, slices

    def step(self, task: str) -> None:
        saved = []
        state = self.optimizer.state
        for param, index in self.slices.get(task, []):
            kept = {k: v[index].clone() for k, v in state.get(param, {}).items() if k in self.STATE}
            saved.append((param, index, param.data[index].clone(), kept))
        self.optimizer.step()
        with torch.no_grad():
            for param, index, value, kept in saved:
                param.data[index] = value
                for key in self.STATE:
                    if key in state.get(param, {}):
                        state[param][key][index] = kept[key] if key in kept else 0.0


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, heads: dict[str, TaskHead], slots: dict[str, int]):
        super().__init__()
        self.encoder, self.heads, self.slots = encoder, nn.ModuleDict(heads), slots

    def forward(self, task: str, input_ids, attention_mask, token_type_ids=None):
        with route(Routing.single(self.slots[task], input_ids.shape[0], input_ids.device)):
            hidden = encode(self.encoder, input_ids, attention_mask, token_type_ids)
        return self.heads[task](hidden, attention_mask)


@dataclass
class TicketShareOutcome:
    backbone: ArtifactVersion | None
    tasks: dict[str, ArtifactVersion]
    metrics: dict[str, dict[str, float]]
    train_seconds: float


def train_ticketshare(specs: list[TaskSpec], backbone: Backbone, config: TrainConfig, store: Store,
                      data_dirs: dict[str, str | None], masks: dict[str, Mask] | None, name: str,
                      show_progress: bool = True) -> TicketShareOutcome:
    """`masks=None` is plain multi-task learning (every gate open)."""
    from trainers.run import _has_accelerator

    accelerator = Accelerator(cpu=not _has_accelerator(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(config.seed)
    encoder, layers = backbone.model, backbone.config.num_hidden_layers
    heads_per_layer = backbone.config.num_attention_heads
    open_mask = (torch.ones(layers, heads_per_layer, dtype=torch.bool), torch.ones(layers, dtype=torch.bool))
    method = "mtl" if masks is None else "ticketshare"
    masks = {spec.name: (masks or {}).get(spec.name, open_mask) for spec in specs}
    slots = {spec.name: i + 1 for i, spec in enumerate(specs)}
    table = gates.install(encoder)
    for spec in specs:
        table.patterns[slots[spec.name]] = (masks[spec.name][0].float(), masks[spec.name][1].float())
    head_config = HeadConfig(pooling=config.pooling, dropout=config.head_dropout)
    model = MultiTaskModel(encoder, {s.name: TaskHead(backbone.config.hidden_size, s.num_outputs, head_config)
                                     for s in specs}, slots)

    collate = DataCollatorWithPadding(backbone.tokenizer)
    train_loaders, eval_loaders, samplers = {}, {}, {}
    with accelerator.main_process_first():
        for spec in specs:
            train = tokenize(load_split(spec, spec.train_split, data_dirs.get(spec.name), config.train_samples, config.seed),
                             backbone.tokenizer, config.max_length)
            dev = tokenize(load_split(spec, spec.eval_split, data_dirs.get(spec.name), config.eval_samples, config.seed),
                           backbone.tokenizer, config.max_length)
            columns = [c for c in (*MODEL_INPUTS, "labels") if c in train.column_names]
            samplers[spec.name] = LengthGroupedBatches(list(train["length"]), config.batch_size, config.seed)
            train_loaders[spec.name] = DataLoader(train.select_columns(columns), batch_sampler=samplers[spec.name],
                                                  collate_fn=collate)
            eval_loaders[spec.name] = DataLoader(dev.select_columns(columns), batch_size=config.eval_batch_size,
                                                 collate_fn=collate)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=config.lr or 5e-5)
    prepared = accelerator.prepare(model, optimizer, *train_loaders.values(), *eval_loaders.values())
    wrapped, optimizer = prepared[0], prepared[1]
    names = [s.name for s in specs]
    train_loaders = dict(zip(names, prepared[2:2 + len(names)]))
    eval_loaders = dict(zip(names, prepared[2 + len(names):]))
    per_epoch = sum(len(loader) for loader in train_loaders.values())
    total = config.max_steps or per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    strict = StrictSharing(optimizer, {n: masked_slices(encoder, masks[n]) for n in names})
    by_name = {s.name: s for s in specs}

    def evaluate() -> dict[str, dict[str, float]]:
        wrapped.eval()
        results = {}
        with torch.no_grad():
            for task, loader in eval_loaders.items():
                preds, refs = [], []
                for batch in loader:
                    logits = wrapped(task, **{k: batch[k] for k in MODEL_INPUTS if k in batch})
                    p, r = accelerator.gather_for_metrics((predictions(by_name[task], logits), batch["labels"]))
                    preds.append(p.float().cpu().numpy())
                    refs.append(r.float().cpu().numpy())
                results[task] = compute_metrics(by_name[task], np.concatenate(preds), np.concatenate(refs))
        wrapped.train()
        return results

    started, step, best_score, best_state, best_metrics = time.perf_counter(), 0, -math.inf, None, {}
    rng = random.Random(config.seed)
    wrapped.train()
    for epoch in range(math.ceil(total / per_epoch)):
        for sampler in samplers.values():
            sampler.set_epoch(epoch)
        schedule = [(task, batch) for task, loader in train_loaders.items() for batch in loader]
        rng.shuffle(schedule)  # every batch from one task; tasks interleaved in proportion to their size
        for task, batch in schedule:
            logits = wrapped(task, **{k: batch[k] for k in MODEL_INPUTS if k in batch})
            spec = by_name[task]
            loss = (nn.functional.mse_loss(logits.squeeze(-1), batch["labels"].float()) if spec.is_regression
                    else nn.functional.cross_entropy(logits, batch["labels"]))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            strict.step(task)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == total:
                break
        metrics = evaluate()
        score = float(np.mean([metrics[t][by_name[t].metric] for t in names]))
        if score > best_score:
            best_score, best_metrics = score, metrics
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step == total:
            break
    model.load_state_dict(best_state)
    seconds = time.perf_counter() - started
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return TicketShareOutcome(None, {}, best_metrics, seconds)
    outcome = _publish(specs, backbone, model, masks, method, store, name, config, best_metrics, seconds)
    accelerator.wait_for_everyone()
    return outcome


def _publish(specs, backbone: Backbone, model: MultiTaskModel, masks: dict[str, Mask], method: str, store: Store,
             name: str, config: TrainConfig, metrics: dict, seconds: float) -> TicketShareOutcome:
    encoder = model.encoder
    shared_fingerprint = fingerprint(encoder)
    with tempfile.TemporaryDirectory() as scratch:  # the checkpoint's config and tokenizer files
        backbone.tokenizer.save_pretrained(scratch)
        encoder.config.to_json_file(str(Path(scratch) / "config.json"))
        files = {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}
    shared = artifact.publish(store, Manifest(
        name=f"{name}-backbone", kind="backbone", method=method, task=specs[0], head=HeadConfig(),
        backbone=backbone.ref(), hyperparameters=config.model_dump(), metrics={},
        details={"fingerprint": shared_fingerprint, "tasks": [s.name for s in specs], "train_seconds": round(seconds, 1),
                 "metrics": metrics}), encoder.state_dict(), files=files)
    shared_ref = BackboneRef(name=f"registry:{shared}", fingerprint=shared_fingerprint,
                             model_type=encoder.config.model_type, num_layers=encoder.config.num_hidden_layers,
                             hidden_size=encoder.config.hidden_size)
    tasks = {}
    for spec in specs:
        keep_heads, keep_ffn = masks[spec.name]
        head = model.heads[spec.name]
        tasks[spec.name] = artifact.publish(store, Manifest(
            name=f"{name}-{spec.name}", kind="structure_mask", method=method, task=spec, head=head.config,
            backbone=shared_ref, hyperparameters=config.model_dump(), metrics=metrics[spec.name],
            trainable_params=0, details={"shared_backbone": f"{shared}@{shared.digest}",
                                         "heads_kept": int(keep_heads.sum()), "ffn_kept": int(keep_ffn.sum())}),
            to_tensors(keep_heads, keep_ffn) | head.tensors())
    return TicketShareOutcome(shared, tasks, metrics, seconds)

