"""The Python client, where users look for it: `from ticketserve.client import Client`.
Everything lives in ticketserve.runtime.client; this module only names it."""

from ticketserve.runtime.client import (
    AsyncClient,
    BackboneMismatch,
    Client,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Prediction,
    PredictResult,
    TicketserveError,
    Unauthenticated,
    Unavailable,
)

__all__ = ["AsyncClient", "BackboneMismatch", "Client", "InvalidArgument", "NotFound", "Overloaded", "PermissionDenied",
           "Prediction", "PredictResult", "TicketserveError", "Unauthenticated", "Unavailable"]
