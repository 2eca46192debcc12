"""What an execution backend is, and the registry of backends by name.

A backend runs the shared encoder's forward for the runtime (TEI's `Backend` is the model):
it says which examples of a batch can share one forward (`group`) and computes their token
states (`hidden`). Tasks attach to the runtime's `SharedEncoder` whatever the backend; a
backend only changes how the forward runs — torch eager, an exported ONNX graph, later a
CUDA graph or OpenVINO — so adding one is one module here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import TYPE_CHECKING, ClassVar

import torch

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.routing import Routing
from ticketserve.core.shared_encoder import SharedEncoder

if TYPE_CHECKING:
    from ticketserve.runtime.executor import LoadedTask


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, shared: SharedEncoder, backbone: Backbone, device: str | None):
        self.shared, self.backbone = shared, backbone

    @classmethod
    def placement(cls, device: str | torch.device | None, dtype: torch.dtype, quantize: str) -> torch.device:
        """Where the runtime keeps the encoder and its tasks for this backend (refusing what it
        cannot run)."""
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @abstractmethod
    def group(self, task: LoadedTask) -> Hashable:
        """Examples whose tasks give the same group run in one forward."""

    @abstractmethod
    def hidden(self, tasks: list[LoadedTask], inputs: dict[str, torch.Tensor], routing: Routing) -> torch.Tensor:
        """Token states of one group's examples, each with its own task."""


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if cls.name in _BACKENDS:
        raise ValueError(f"backend {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    return cls


def backend_named(name: str) -> type[Backend]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise InvalidArgument(f"unknown backend {name!r} (one of: {', '.join(sorted(_BACKENDS))})") from None


def backends() -> list[str]:
    return sorted(_BACKENDS)
