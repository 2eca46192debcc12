"""In-process execution of tasks on one shared backbone.

Tasks of backbone-sharing kinds attach to the shared encoder under a slot, so one forward
pass serves a batch that mixes them; other kinds run on their own encoder. Each task keeps
its own head. The gRPC server builds on this; the CLI's eval and predict use it directly.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn

from registry import ArtifactVersion
from registry.manifest import Manifest, TaskSpec
from ticketserve.artifact import Artifact
from ticketserve.backbone import Backbone
from ticketserve.errors import CorruptArtifact, InvalidArgument, NotFound, TicketserveError, excerpt
from ticketserve.kinds import get_kind
from ticketserve.kinds.routing import Routing, route
from ticketserve.model import TaskHead, encode


@dataclass
class LoadedTask:
    """A servable task. Its tensors live where its kind put them (the shared encoder's row or
    gate tables, a mask set, a private encoder), not here: a resident task costs one copy."""

    name: str
    version: ArtifactVersion
    manifest: Manifest
    slot: int
    encoder: nn.Module
    head: TaskHead

    @property
    def spec(self) -> TaskSpec:
        return self.manifest.task


@dataclass
class Prediction:
    label: str | None
    score: float  # probability of the label, or the regression value
    probabilities: dict[str, float]


class Runtime:
    def __init__(self, backbone: Backbone, device: str | torch.device | None = None, max_length: int = 256):
        self.backbone = backbone
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = backbone.model.to(self.device).eval()
        self.max_length = max_length
        self.tasks: dict[str, LoadedTask] = {}
        self._slots = itertools.count(1)
        self._lock = threading.Lock()
        # forwards on the shared encoder run one at a time (supermask tasks substitute their
        # weights into it for the duration of their forward; intra-op threads still apply),
        # and a task is detached only between forwards
        self._forward_lock = threading.Lock()

    def add(self, artifact: Artifact, name: str | None = None) -> LoadedTask:
        """Make an artifact servable under `name` (default: its artifact name); replaces any
        task of that name once the new one is ready."""
        name = name or artifact.manifest.name
        kind = get_kind(artifact.manifest.kind)
        with self._lock:
            slot = next(self._slots)
            try:
                encoder = kind.attach(self.encoder, slot, artifact.kind_tensors)  # placed on the encoder's device
                head = TaskHead.from_tensors(artifact.head_tensors, artifact.manifest.head).to(self.device)
            except Exception as exc:  # no forward routes to this slot yet: undo whatever attach did
                kind.detach(self.encoder, slot)
                if isinstance(exc, TicketserveError):
                    raise
                raise CorruptArtifact(f"{artifact.version} passed its checks but cannot be attached "
                                      f"({type(exc).__name__}: {excerpt(str(exc), 300)})") from exc
            loaded = LoadedTask(name, artifact.version, artifact.manifest, slot, encoder, head)
            old, self.tasks[name] = self.tasks.get(name), loaded
        if old is not None:
            self.remove_slot(old)
        return loaded

    def remove(self, name: str | LoadedTask) -> None:
        """Stop serving a task, by name, or exactly this loaded task (a no-op if its name
        already serves another one)."""
        with self._lock:
            task = self.tasks.get(name) if isinstance(name, str) else name
            if task is None:
                raise NotFound(f"task {name!r} is not loaded")
            if self.tasks.get(task.name) is task:
                del self.tasks[task.name]
        self.remove_slot(task)

    def remove_slot(self, task: LoadedTask) -> None:
        with self._forward_lock:  # never under a forward that resolved this task
            get_kind(task.manifest.kind).detach(self.encoder, task.slot)

    def get(self, name: str) -> LoadedTask:
        try:
            return self.tasks[name]
        except KeyError:
            raise NotFound(f"task {name!r} is not loaded (loaded: {', '.join(sorted(self.tasks)) or 'none'})") from None

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidArgument(f"{len(texts)} texts but {len(pairs)} text pairs")
        encoded = self.backbone.tokenizer(texts, pairs, padding=True, truncation=True,
                                          max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    @torch.inference_mode()
    def logits(self, task_names: list[str], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One output row per example; examples may name different tasks. Shared-backbone tasks
        run in one forward pass; each private-encoder task in its own. Resolution and forward
        happen under one lock, so a task replaced meanwhile is never half-applied."""
        with self._forward_lock:
            return self._logits(task_names, inputs)

    def _logits(self, task_names: list[str], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        tasks = [self.get(n) for n in task_names]
        by_name = {task.name: task for task in tasks}  # fixed for this call even if a task is swapped
        outputs: list[torch.Tensor | None] = [None] * len(tasks)
        groups: dict[int, list[int]] = {}
        for i, task in enumerate(tasks):  # group by encoder: the shared one, or a private copy
            groups.setdefault(id(task.encoder), []).append(i)
        for rows in groups.values():
            index = torch.tensor(rows, device=self.device)
            sub = {k: v.index_select(0, index) for k, v in inputs.items()}
            slots = torch.tensor([tasks[i].slot for i in rows], device=self.device)
            hidden = self.hidden(tasks[rows[0]].encoder, sub, Routing(slots))
            by_task: dict[str, list[int]] = {}
            for position, i in enumerate(rows):
                by_task.setdefault(tasks[i].name, []).append(position)
            for name, positions in by_task.items():
                at = torch.tensor(positions, device=self.device)
                out = by_name[name].head(hidden.index_select(0, at), sub["attention_mask"].index_select(0, at))
                for position, row in zip(positions, out):
                    outputs[rows[position]] = row
        return outputs  # type: ignore[return-value]

    def hidden(self, encoder: nn.Module, inputs: dict[str, torch.Tensor], routing: Routing) -> torch.Tensor:
        """Token states of one group of examples on one encoder (the execution backend's job)."""
        with route(routing):
            return encode(encoder, inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))

    def predict(self, task_names: list[str], texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        if len(task_names) != len(texts):
            raise InvalidArgument(f"{len(texts)} texts but {len(task_names)} task names")
        return self.predictions(task_names, self.logits(task_names, self.tokenize(texts, pairs)))

    def predictions(self, task_names: list[str], outputs: list[torch.Tensor]) -> list[Prediction]:
        """Labels and probabilities (or values, for regression) from per-example outputs."""
        results = []
        for name, row in zip(task_names, outputs):
            spec = self.get(name).spec
            if spec.is_regression:
                results.append(Prediction(None, float(row[0]), {}))
                continue
            probs = row.float().softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(Prediction(spec.labels[best], probs[best], dict(zip(spec.labels, probs))))
        return results
