"""ticketserve: many NLP tasks served from one shared encoder through tiny per-task artifacts."""

from ticketserve import generated

__version__ = "0.1.0"

generated.check()
