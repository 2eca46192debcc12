"""Trainers: each method turns (backbone, task data, config) into artifacts; importing this
package registers every method."""

from ticketserve.trainers import bitfit, dominant, full, lora, supermask, supertickets, ticketshare  # noqa: F401
from ticketserve.trainers.base import Method, RunContext, get_method, methods, register_method

__all__ = ["Method", "RunContext", "get_method", "methods", "register_method"]
