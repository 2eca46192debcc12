"""Ticket-Share (Liang et al.; docs/concepts/methods.md#super-tickets-and-ticket-share): one
encoder trained on several tasks at once, each batch from one task and run with that task's super-ticket gates. A structure kept by
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
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from pydantic import Field
from torch import nn

from ticketserve.core import artifact
from ticketserve.core.backbone import Backbone, encoder_layers, fingerprint
from ticketserve.core.data import load_split
from ticketserve.core.kinds.structure_mask import to_tensors
from ticketserve.core.model import TaskHead, task_loss
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder
from ticketserve.core.tasks import get_task
from ticketserve.registry import ArtifactVersion, BackboneRef, HeadConfig, Store, TaskSpec
from ticketserve.trainers.base import Method, Outcome, RunContext, register_method, run_manifest
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.loop import (MODEL_INPUTS, accelerator_for, adamw, evaluation_batches, linear_schedule,
                                       scores, tokenize, training_batches)
from ticketserve.trainers.supertickets import SweepOptions, keep_masks, sweep

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
    def __init__(self, shared: SharedEncoder, heads: dict[str, TaskHead], slots: dict[str, int]):
        super().__init__()
        self.encoder, self.heads, self.slots = shared.module, nn.ModuleDict(heads), slots
        self.shared = shared

    def forward(self, task: str, input_ids, attention_mask, token_type_ids=None):
        routing = Routing.single(self.slots[task], input_ids.shape[0], input_ids.device)
        hidden = self.shared.encode(input_ids, attention_mask, token_type_ids, routing)
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
    """`masks=None` is plain multi-task learning (every gate open). Data, optimizer, schedule,
    loss and evaluation are the shared loop's; what is its own is the interleaving of tasks and
    the strict sharing of masked structures."""
    accelerator = accelerator_for(config, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(config.seed)
    encoder, layers = backbone.model, backbone.config.num_hidden_layers
    heads_per_layer = backbone.config.num_attention_heads
    open_mask = (torch.ones(layers, heads_per_layer, dtype=torch.bool), torch.ones(layers, dtype=torch.bool))
    method = "mtl" if masks is None else "ticketshare"
    masks = {spec.name: (masks or {}).get(spec.name, open_mask) for spec in specs}
    slots = {spec.name: i + 1 for i, spec in enumerate(specs)}
    shared = SharedEncoder(encoder)
    for spec in specs:
        shared.gates.patterns[slots[spec.name]] = (masks[spec.name][0].float(), masks[spec.name][1].float())
    head_config = HeadConfig(pooling=config.pooling, dropout=config.head_dropout)
    model = MultiTaskModel(shared, {s.name: TaskHead(backbone.config.hidden_size, s.num_outputs, head_config)
                                     for s in specs}, slots)

    train_loaders, eval_loaders = {}, {}
    with accelerator.main_process_first():
        for spec in specs:
            train = tokenize(load_split(spec, spec.train_split, data_dirs.get(spec.name), config.train_samples, config.seed),
                             backbone.tokenizer, config.max_length)
            dev = tokenize(load_split(spec, spec.eval_split, data_dirs.get(spec.name), config.eval_samples, config.seed),
                           backbone.tokenizer, config.max_length)
            train_loaders[spec.name] = training_batches(train, backbone.tokenizer, config)
            eval_loaders[spec.name] = evaluation_batches(dev, backbone.tokenizer, config)
    samplers = {task: loader.batch_sampler for task, loader in train_loaders.items()}
    lr = config.lr or 5e-5
    optimizer = adamw([([p for p in model.parameters() if p.dim() >= 2], lr, True),
                       ([p for p in model.parameters() if p.dim() < 2], lr, False)], config, lr)
    prepared = accelerator.prepare(model, optimizer, *train_loaders.values(), *eval_loaders.values())
    wrapped, optimizer = prepared[0], prepared[1]
    names = [s.name for s in specs]
    train_loaders = dict(zip(names, prepared[2:2 + len(names)]))
    eval_loaders = dict(zip(names, prepared[2 + len(names):]))
    per_epoch = sum(len(loader) for loader in train_loaders.values())
    total = config.max_steps or per_epoch * config.epochs
    scheduler = linear_schedule(optimizer, config, total)
    strict = StrictSharing(optimizer, {n: masked_slices(encoder, masks[n]) for n in names})
    by_name = {s.name: s for s in specs}

    def evaluate() -> dict[str, dict[str, float]]:
        wrapped.eval()
        results = {task: scores(lambda inputs: wrapped(task, **inputs), loader, by_name[task], accelerator)
                   for task, loader in eval_loaders.items()}
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
            accelerator.backward(task_loss(by_name[task], logits, batch["labels"]))
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
    shared = artifact.publish(store, run_manifest(
        f"{name}-backbone", "backbone", method, specs[0], backbone.ref(), config, head=HeadConfig(),
        details={"fingerprint": shared_fingerprint, "tasks": [s.name for s in specs], "train_seconds": round(seconds, 1),
                 "metrics": metrics}), encoder.state_dict(), files=files)
    shared_ref = BackboneRef(name=f"registry:{shared}", fingerprint=shared_fingerprint,
                             model_type=encoder.config.model_type, num_layers=encoder.config.num_hidden_layers,
                             hidden_size=encoder.config.hidden_size)
    tasks = {}
    for spec in specs:
        keep_heads, keep_ffn = masks[spec.name]
        head = model.heads[spec.name]
        tasks[spec.name] = artifact.publish(store, run_manifest(
            f"{name}-{spec.name}", "structure_mask", method, spec, shared_ref, config, head=head.config,
            metrics=metrics[spec.name], details={"shared_backbone": f"{shared}@{shared.digest}",
                                                 "heads_kept": int(keep_heads.sum()), "ffn_kept": int(keep_ffn.sum())}),
            to_tensors(keep_heads, keep_ffn) | head.tensors())
    return TicketShareOutcome(shared, tasks, metrics, seconds)


class TicketShareOptions(SweepOptions):
    tasks: str = Field(description="comma-separated GLUE tasks trained together")
    superticket: list[str] = Field(default_factory=list, description="TASK=SWEEP: a published sweep whose best "
                                   "level's mask the task uses (default: sweep first); repeatable")
    plain: bool = Field(False, description="plain multi-task learning: every gate open, no sweeps")
    data_root: str | None = Field(None, description="directory with one data directory per task (default: --data-dir)")


@register_method
class TicketShare(Method):
    """Ticket-Share as a method: a super-ticket sweep per task (unless given), then one shared
    encoder trained on every task, published as a `backbone` entry plus one `structure_mask`
    artifact per task. `--plain` is the multi-task baseline with every gate open."""

    name = "ticketshare"
    kind = "structure_mask"
    default_lr = 5e-5
    description = "Ticket-Share: super tickets per task, one shared encoder trained on all (--plain: plain MTL)"
    Options = TicketShareOptions

    def run(self, context: RunContext) -> Outcome:
        options, store, backbone = self.options, context.store, context.backbone
        specs = [get_task(t.strip()) for t in options.tasks.split(",")]
        dirs = {s.name: (str(Path(options.data_root) / s.name) if options.data_root else context.data_dir) for s in specs}
        given = dict(item.split("=", 1) for item in options.superticket)
        masks = None
        if not options.plain:
            masks = {}
            for spec in specs:
                ref = given.get(spec.name) or str(sweep(spec, backbone, context.config, store, dirs[spec.name],
                                                        options.shares, options.ticket_type,
                                                        show_progress=context.show_progress))
                found = artifact.load(store, ref, backbone, expect_kind="superticket")
                masks[spec.name] = keep_masks(found.tensors, found.manifest.details["best_level"])
        outcome = train_ticketshare(specs, backbone, context.config, store, dirs, masks,
                                    context.name or ("mtl" if options.plain else "ticketshare"), context.show_progress)
        if outcome.backbone is None:
            return Outcome([], {}, "")
        summary = {"backbone": str(outcome.backbone), "tasks": {k: str(v) for k, v in outcome.tasks.items()},
                   "metrics": outcome.metrics, "train_seconds": round(outcome.train_seconds, 1)}
        return Outcome([outcome.backbone, *outcome.tasks.values()], summary,
                       f"published shared encoder [bold]{outcome.backbone}[/] and " + ", ".join(
                           f"{v} ({next(iter(outcome.metrics[k].values())):.4f})" for k, v in outcome.tasks.items()))
