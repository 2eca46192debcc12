"""The `ticketserve` command: train, eval, predict, serve, and the registry."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from ticketserve.cli import registry, serving, tickets, train
from ticketserve.cli.common import HELP_MARKUP, err
from ticketserve.core.errors import TicketserveError

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False, rich_markup_mode=HELP_MARKUP)
for group in (train.commands, serving.commands):
    app.registered_commands += group.registered_commands
app.add_typer(registry.registry_app, name="registry")
app.add_typer(tickets.ticket_app, name="ticket")


def main() -> None:
    try:
        app()
    except TicketserveError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        err.print(f"[red]error:[/] invalid settings: {problems}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
