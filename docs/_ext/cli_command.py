"""The command tree behind the `ticketserve` typer app, for the CLI reference
(docs/_ext/reference.py) and the test that checks every command line in the docs against it
(tests/test_docs.py). typer carries its own copy of click, so this goes through typer's names."""

from __future__ import annotations

from collections.abc import Iterator

import typer

from ticketserve.cli.app import app

command = typer.main.get_command(app)


def walk(cmd=command, path: tuple[str, ...] = ("ticketserve",), parent: typer.Context | None = None) -> Iterator:
    """(path, command, its context) of the app and every command under it, depth first."""
    ctx = typer.Context(cmd, info_name=path[-1], parent=parent)
    yield path, cmd, ctx
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from walk(sub, (*path, name), ctx)
