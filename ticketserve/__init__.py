"""ticketserve: many NLP tasks served from one shared encoder through tiny per-task artifacts."""

__version__ = "0.1.0"
