"""Command-line flags from pydantic models: every field is one `--flag` with its description as
help and its default; pydantic checks the values. A model is the one source of its flags.

The flags are added to their command only when that command is parsed or asked for help, so
the models' modules (the trainers: torch and friends) load only for the commands that use them.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import typer
import typer.main
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.core import TyperCommand


def flag(name: str, field: FieldInfo) -> str:
    """A field's flag: `--field-name`, or the one its `json_schema_extra={"flag": ...}` names."""
    return (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")


def cli_type(annotation: Any) -> Any:
    """The type a flag parses to (None: the field has no command-line form)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return cli_type(rest[0]) if len(rest) == 1 else None
    if origin is Literal:
        return str  # pydantic names the allowed values when one is wrong
    if origin is list:
        item = cli_type(args[0]) if args else None
        return list[item] if item in (str, int, float) else None
    return annotation if annotation in (str, int, float, bool) else None


def fields(model: type[BaseModel]) -> Iterable[tuple[str, FieldInfo, Any]]:
    """(name, field, flag type) of every field that has a command-line form."""
    for name, field in model.model_fields.items():
        kind = cli_type(field.annotation)
        if kind is not None and (field.json_schema_extra or {}).get("cli", True):
            yield name, field, kind


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "no default" if value in (None, []) else f"default {value}"


def option(name: str, kind: Any, flag_name: str, help_text: str, default: Any = None,
           show_default: bool = False) -> inspect.Parameter:
    """One flag, unset (None) unless a default is given, so "not given" stays visible."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[Optional[kind], typer.Option(flag_name, help=help_text,
                                                                               show_default=show_default)])


def model_options(model: type[BaseModel]) -> list[inspect.Parameter]:
    """One flag per field, its default the model's (shown in --help)."""
    return [option(name, kind, flag(name, field), field.description or "",
                   None if field.is_required() else field.get_default(call_default_factory=True), show_default=True)
            for name, field, kind in fields(model)]


def _as_parameters(flags: list[inspect.Parameter]) -> list:
    """Typer's own parameter objects for these flags (built as typer builds any command)."""

    def stub(**kwargs: Any) -> None:
        """Never called: it only carries the signature."""

    stub.__signature__ = inspect.Signature(flags)
    holder = typer.Typer()
    holder.command()(stub)
    names = {f.name for f in flags}
    return [p for p in typer.main.get_command(holder).params if p.name in names]


def with_flags(make: Callable[[], list[inspect.Parameter]]) -> type[TyperCommand]:
    """A command class whose flags from `make()` join its own when it is parsed or helped; the
    callback finds their values in `ctx.meta["settings"]` (unset ones: None or empty)."""

    class WithFlags(TyperCommand):
        extra: list | None = None

        def get_params(self, ctx: typer.Context) -> list:
            if self.extra is None:
                self.extra = _as_parameters(make())
                self.params.extend(self.extra)
            return super().get_params(ctx)

        def invoke(self, ctx: typer.Context) -> Any:
            names = {p.name for p in self.extra or ()}
            ctx.meta["settings"] = {k: ctx.params.pop(k) for k in list(ctx.params) if k in names}
            return super().invoke(ctx)

    return WithFlags


def settings(ctx: typer.Context) -> dict[str, Any]:
    """The values of a `with_flags` command's model flags that were given (or have a default)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.meta["settings"].items()
            if v is not None and v != ()}
