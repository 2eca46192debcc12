"""The `ticketserve` command line, one module per command group."""

from ticketserve.cli.app import app, main

__all__ = ["app", "main"]
