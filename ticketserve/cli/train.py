"""`ticketserve train` and `ticketserve methods`. Flags come from the models that hold them:
`TrainConfig` for every run, each registered method's `Options` for that method (the help
says which methods take a flag and their default), so a new method brings its flags along."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ticketserve.cli.common import BackboneOpt, DataDirOpt, JsonOpt, RegistryOpt, emit, out, store_at
from ticketserve.cli.options import default_text, fields, flag, model_options, option, settings, with_flags
from ticketserve.core.errors import InvalidArgument

commands = typer.Typer()


def method_flags() -> dict[str, tuple[Any, str, dict[str, str]]]:
    """Every method option: name → (flag type, flag, {method: its default and help})."""
    from ticketserve.trainers import methods as registered

    union: dict[str, tuple[Any, str, dict[str, str]]] = {}
    for method_name, cls in sorted(registered().items()):
        for name, field, kind in fields(cls.Options):
            known = union.setdefault(name, (kind, flag(name, field), {}))
            if known[:2] != (kind, flag(name, field)):
                raise TypeError(f"option {name} means different things to different methods")
            known[2][method_name] = f"{default_text(field)}): {field.description}"
    return union


def train_flags() -> list[inspect.Parameter]:
    """`TrainConfig`'s flags, then every method option (its help names the methods that take it)."""
    from ticketserve.trainers.config import TrainConfig

    flags = model_options(TrainConfig)
    for name, (kind, flag_name, by_method) in method_flags().items():
        texts = sorted(set(by_method.values()))
        help_text = "; ".join(f"{', '.join(m for m, t in by_method.items() if t == text)} ({text}" for text in texts)
        flags.append(option(name, kind, flag_name, help_text))
    return flags


@commands.command(cls=with_flags(train_flags))
def train(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="a training method (see `ticketserve methods`)")],
    task: Annotated[Optional[str], typer.Option(help="GLUE task name, or a name for your own task")] = None,
    backbone: BackboneOpt = None,
    data_dir: DataDirOpt = None,
    text_field: Annotated[Optional[str], typer.Option(help="custom task: the text column")] = None,
    text_pair_field: Annotated[Optional[str], typer.Option(help="custom task: the second text column")] = None,
    label_field: Annotated[str, typer.Option(help="custom task: the label column")] = "label",
    labels: Annotated[Optional[str], typer.Option(help="custom task: comma-separated label names (default: from the data; 'regression' for a value)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="custom task: accuracy|f1|matthews|pearson|spearman")] = None,
    name: Annotated[Optional[str], typer.Option(help="artifact name (default: TASK-METHOD)")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="extra tags to move to this version")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train with any registered method and publish what it makes to the registry."""
    from ticketserve.core.backbone import load_backbone
    from ticketserve.trainers import get_method, methods
    from ticketserve.trainers.config import TrainConfig
    from ticketserve.trainers.run import train as run_training

    values = settings(ctx)
    config = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.model_fields})
    flags = method_flags()
    given = {k: v for k, v in values.items() if k in flags}
    known = methods()
    if method in known:
        takes = set(known[method].Options.model_fields)
        for key in given.keys() - takes:
            raise InvalidArgument(f"method {method} takes no option {flags[key][1]}")
    chosen = get_method(method, given)
    store = store_at(registry)
    start = chosen.starts_from(store)
    spec = _task_spec(task or (start[0].name if start else None), start, data_dir, text_field, text_pair_field,
                      label_field, labels, metric)
    outcome = run_training(chosen, spec, load_backbone(backbone or (start[1] if start else None), store), config, store,
                           data_dir, name, tuple(tag or ()), show_progress=not as_json)
    if outcome.published:  # nothing on the non-main processes of a distributed run
        emit(as_json, outcome.summary, lambda: out.print(outcome.line))


def _task_spec(task, start, data_dir, text_field, text_pair_field, label_field, labels, metric):
    """The run's task: a GLUE task, a custom one described by the flags, the one of the
    artifact the method starts from, or none (methods over several tasks name them)."""
    from ticketserve.core.data import check_labels, infer_labels
    from ticketserve.core.tasks import custom_task, get_task

    if task is None:
        return None
    if start is not None and task == start[0].name:
        return start[0]  # a custom task's spec travels with its artifacts
    if text_field:
        if data_dir is None:
            raise InvalidArgument("a custom task (--text-field) needs --data-dir")
        if labels is None:
            names = infer_labels(data_dir, label_field)
        else:
            names = [] if labels == "regression" else [n.strip() for n in labels.split(",")]
            check_labels(data_dir, label_field, names)
        return custom_task(task, text_field, text_pair_field, label_field, names, metric)
    return get_task(task)


@commands.command()
def methods(as_json: JsonOpt = False) -> None:
    """The training methods: artifact kind, default learning rate, options, what each trains."""
    from ticketserve.trainers import methods as registered

    rows = [{"method": name, "kind": cls.kind, "default_lr": cls.default_lr, "description": cls.description,
             "options": {flag(key, field): default_text(field) for key, field, _ in fields(cls.Options)}}
            for name, cls in sorted(registered().items())]

    def table() -> None:
        grid = Table("method", "kind", "default lr", "options", "what it trains")
        for row in rows:
            options = ", ".join(row["options"])
            grid.add_row(row["method"], row["kind"], f"{row['default_lr']:g}", options, row["description"])
        out.print(grid)

    emit(as_json, rows, table)
