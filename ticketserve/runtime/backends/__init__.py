"""Execution backends, one module each; importing this package registers them all."""

from ticketserve.runtime.backends import onnx_backend, torch_backend  # noqa: F401
from ticketserve.runtime.backends.base import Backend, backend_named, backends, register_backend

__all__ = ["Backend", "backend_named", "backends", "register_backend"]
