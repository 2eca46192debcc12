"""The shared encoder as the kinds see it: one place where every task term meets the backbone.

Each dense matrix becomes a `TaskLinear` (the same weight and bias Parameters, the same
state-dict names) that computes the shared product y = x·Wᵀ + b once — in int8 where
`--quantize int8` packed the weight — and then, for the examples routed to them, adds the
terms of every kind that keeps per-task state on this encoder (row deltas, LoRA factors,
supermask corrections, a test's toy kind), always in the order of the kinds' names, so the
result never depends on which task was attached first. Head and FFN gates are applied at
their two fixed points (`gates.py`). The batch's routing and any explicit gates are arguments
of the encoder's forward (`encode`, `applying`), which holds them for its layers on the calling
thread (transformers' layers call each Linear with the activations alone), never in a
module-level context variable.

The owner — the runtime, or a trainer — holds the `SharedEncoder` and with it every kind's
state for this encoder (`state`): nothing lives in module globals, and two runtimes over one
checkpoint never see each other's tasks.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from ticketserve.core.backbone import MATRICES, encoder_layers
from ticketserve.core.gates import Gates, GateSet
from ticketserve.core.quantize import linear as shared_linear
from ticketserve.core.routing import Routing


class Terms:
    """One kind's per-task state on a shared encoder, as terms of its dense matrices."""

    def add(self, matrix: str, layer: TaskLinear, x: torch.Tensor, y: torch.Tensor,
            routing: Routing | None) -> torch.Tensor:
        """y plus this kind's term of `matrix` for the examples routed to its tasks (in place
        where autograd allows; y itself when none of them is in the batch)."""
        return y


State = TypeVar("State")


class _Call(threading.local):
    """What the running forward was given, per thread."""

    routing: Routing | None = None
    explicit: Gates | None = None
    gates: Gates | None = None  # the routing's gates, computed once per forward
    gates_known: bool = False


class TaskLinear(nn.Linear):
    """A shared dense matrix: the shared product, then its host's terms; gated where it is the
    attention output (heads, on its input) or the FFN output (on its output)."""

    def __init__(self, base: nn.Linear, name: str, host: SharedEncoder, head_gate: int | None, ffn_gate: int | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.name, self.host = name, host
        self.head_gate, self.ffn_gate = head_gate, ffn_gate

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        """A copy is a plain linear layer: the task terms belong to the host, not to the weights."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = copy.deepcopy(self.weight, memo)
        plain.bias = copy.deepcopy(self.bias, memo)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        host = self.host
        call = host.call
        if self.head_gate is not None and (gates := host.gates_now()) is not None:
            x = host.gates.gate_heads(gates, self.head_gate, x)
        y = shared_linear(x, self.weight, self.bias)
        for terms in host.ordered:
            y = terms.add(self.name, self, x, y, call.routing)
        if self.ffn_gate is not None and (gates := host.gates_now()) is not None:
            y = host.gates.gate_ffn(gates, self.ffn_gate, y)
        return y


class SharedEncoder:
    """An encoder module made shareable (its dense matrices become `TaskLinear`s, in place),
    with the gates and the per-kind state of the tasks that run on it."""

    def __init__(self, module: nn.Module, master: nn.Module | None = None):
        self.module = module
        self.master = master if master is not None else module  # float32 weights, for what needs them exact
        self.gates = GateSet(module.config.num_attention_heads)
        self.ordered: list[Terms] = []  # every kind's terms, by kind name
        self.call = _Call()
        self._states: dict[str, object] = {}
        self._lock = threading.Lock()
        self.matrices: dict[str, TaskLinear] = {}
        for index, block in enumerate(encoder_layers(module)):
            for suffix in MATRICES:
                name, linear = f"encoder.layer.{index}.{suffix}", block.get_submodule(suffix)
                if isinstance(linear, TaskLinear):  # composed before: this host takes it over, empty
                    linear.host = self
                else:
                    linear = TaskLinear(linear, name, self, index if suffix == "attention.output.dense" else None,
                                        index if suffix == "output.dense" else None)
                    parent, _, child = suffix.rpartition(".")
                    block.get_submodule(parent).register_module(child, linear)
                self.matrices[name] = linear

    @property
    def config(self):
        return self.module.config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def state(self, kind: str, build: Callable[[SharedEncoder], State]) -> State:
        """A kind's state on this encoder, built on first use; `Terms` join the forward."""
        with self._lock:
            if kind not in self._states:
                self._states[kind] = build(self)
                self._order()
            return self._states[kind]  # type: ignore[return-value]

    def release(self, kind: str) -> None:
        """Forget a kind's state (a trainer's term, once its artifact is exported)."""
        with self._lock:
            self._states.pop(kind, None)
            self._order()

    def _order(self) -> None:
        # a new list, so a running forward keeps its own
        self.ordered = [self._states[k] for k in sorted(self._states) if isinstance(self._states[k], Terms)]

    @contextmanager
    def applying(self, routing: Routing | None = None, gates: Gates | None = None):
        """Run forwards of this thread with a batch's routing (None: DEFAULT_SLOT) and/or explicit gates."""
        call = self.call
        saved = (call.routing, call.explicit, call.gates, call.gates_known)
        call.routing, call.explicit, call.gates, call.gates_known = routing, gates, None, False
        try:
            yield self
        finally:
            call.routing, call.explicit, call.gates, call.gates_known = saved

    def gates_now(self) -> Gates | None:
        """The running forward's gates: explicit ones, else its routing's patterns (None: all open)."""
        call = self.call
        if call.explicit is not None:
            return call.explicit
        if not self.gates.patterns:
            return None
        if not call.gates_known:
            call.gates, call.gates_known = self.gates.for_batch(call.routing), True
        return call.gates

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               routing: Routing | None = None, gates: Gates | None = None) -> torch.Tensor:
        """Token states of a batch, each example with its own task's terms and gates."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        with self.applying(routing, gates):
            return self.module(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
