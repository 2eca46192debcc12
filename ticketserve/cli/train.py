"""`ticketserve train` and `ticketserve methods`. Flags come from the models that hold them:
`TrainConfig` for every run, each registered method's `Options` for that method (the help
says which methods take a flag and their default), so a new method brings its flags along."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional

import typer

from ticketserve.cli.common import BackboneOpt, DataDirOpt, JsonOpt, RegistryOpt, emit, err, out, store_at
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
            scope = cls.option_scope.get(name)
            known[2][method_name + (f" {scope}" if scope else "")] = f"{default_text(field)}): {field.description}"
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
    text_field: Annotated[Optional[str], typer.Option(help="custom task: the text column (default: GLUE's field names in the files: sentence; sentence1 + sentence2; question + sentence; question1 + question2; premise + hypothesis)")] = None,
    text_pair_field: Annotated[Optional[str], typer.Option(help="custom task: the second text column (default: as --text-field)")] = None,
    label_field: Annotated[str, typer.Option(help="custom task: the label column")] = "label",
    labels: Annotated[Optional[str], typer.Option(help="custom task: comma-separated label names in index order, or 'regression' for a value (default: DIR/labels.json or labels.txt, else the data's values)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="custom task: accuracy, f1, matthews, pearson or spearman")] = None,
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
    spec, about = _task_spec(task or (start[0].name if start else None), start, data_dir, text_field, text_pair_field,
                             label_field, labels, metric)
    if about and not as_json:
        labels_text = ", ".join(about["labels"]) if isinstance(about["labels"], list) else about["labels"]
        hint = (": the values in the data; name them with --labels NAME,... or a labels.txt beside it"
                if about["labels_from"] == "the data" else f" (from {about['labels_from']})")
        err.print(f"task {spec.name}: text field {about['text_fields']}, label field {about['label_field']}; "
                  f"labels {labels_text}{hint}", markup=False, highlight=False)
    outcome = run_training(chosen, spec, load_backbone(backbone or (start[1] if start else None), store), config, store,
                           data_dir, name, tuple(tag or ()), show_progress=not as_json)
    if outcome.published:  # nothing on the non-main processes of a distributed run
        summary = outcome.summary | ({"task_fields": about} if about else {})
        emit(as_json, summary, lambda: out.print(outcome.line))


def _task_spec(task, start, data_dir, text_field, text_pair_field, label_field, labels, metric):
    """The run's task and, for the user's own data, where its labels came from: a GLUE task, a
    custom one (fields from the flags, else GLUE's names in the files; label names from --labels,
    else DIR/labels.json|txt, else the data's values), the one of the artifact the method starts
    from, or none (methods over several tasks name them)."""
    from ticketserve.core.data import check_labels, columns, glue_fields, infer_labels, label_file
    from ticketserve.core.tasks import KNOWN_TASKS, custom_task, get_task

    if task is None:
        return None, None
    if start is not None and task == start[0].name:
        return start[0], None  # a custom task's spec travels with its artifacts
    if task in KNOWN_TASKS and not text_field:
        return get_task(task), None
    if data_dir is None:
        if text_field:
            raise InvalidArgument("a custom task (--text-field) needs --data-dir")
        return get_task(task), None  # unknown: says what to pass
    if not text_field:
        names = columns(data_dir)
        found = glue_fields(names)
        if found is None:
            raise InvalidArgument(
                f"task {task!r}: {data_dir} has fields {', '.join(names)}; name the text with --text-field "
                "(and --text-pair-field), or use GLUE's names: sentence; sentence1 + sentence2; question + sentence; "
                "question1 + question2; premise + hypothesis")
        text_field, text_pair_field = found[0], text_pair_field or found[1]
    named = label_file(data_dir)
    if labels is not None:
        names, source = ([] if labels == "regression" else [n.strip() for n in labels.split(",")]), "--labels"
    elif named is not None:
        source, names = str(named[0]), named[1]
    else:
        names, source = infer_labels(data_dir, label_field), "the data"
    if labels is not None or named is not None:
        check_labels(data_dir, label_field, names)
    fields = text_field + (f" + {text_pair_field}" if text_pair_field else "")
    about = {"text_fields": fields, "label_field": label_field, "labels": names or "regression", "labels_from": source}
    return custom_task(task, text_field, text_pair_field, label_field, names, metric), about


@commands.command()
def methods(as_json: JsonOpt = False) -> None:
    """The training methods: artifact kind, default learning rate, what each trains, its options."""
    from ticketserve.trainers import methods as registered

    rows = [{"method": name, "kind": cls.kind, "default_lr": cls.default_lr, "description": cls.description,
             "options": {flag(key, field): default_text(field) for key, field, _ in fields(cls.Options)},
             "option_help": {flag(key, field): field.description or "" for key, field, _ in fields(cls.Options)},
             "options_used": {flag(key, field): cls.option_scope.get(key, "always") for key, field, _ in fields(cls.Options)}}
            for name, cls in sorted(registered().items())]

    def listing() -> None:  # plain lines: readable in a pipe at any width (a table cut option names short)
        for row in rows:
            out.print(f"{row['method']} ({row['kind']} artifact, default lr {row['default_lr']:g}): {row['description']}",
                      markup=False, highlight=False)
            for scope in sorted(dict.fromkeys(row["options_used"].values()), key=lambda scope: scope != "always"):
                if scope != "always":
                    out.print(f"  {scope}:", markup=False, highlight=False)
                for option_flag, used in row["options_used"].items():
                    if used == scope:
                        indent = "    " if scope != "always" else "  "
                        out.print(f"{indent}{option_flag} ({row['options'][option_flag]}): {row['option_help'][option_flag]}",
                                  markup=False, highlight=False)

    emit(as_json, rows, listing)
