"""Task data from the hub (`datasets`), a local directory of JSONL/CSV/TSV, or the bundled sample.

Whatever the source, rows come out with the task's GLUE field names and integer labels
(float for regression), ready to tokenize.
"""

from __future__ import annotations

from pathlib import Path

from ticketserve.core.errors import DataUnavailable, InvalidArgument
from ticketserve.registry.manifest import TaskSpec

SAMPLE_DIR = Path(__file__).parent / "samples"
SAMPLE = "sample"  # --data-dir sample = the small sample committed inside the package
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def sample_dir(task: str) -> Path:
    path = SAMPLE_DIR / task
    if not path.is_dir():
        available = ", ".join(sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir()))
        raise DataUnavailable(f"no bundled sample for task {task!r} (bundled: {available})")
    return path


def find_split_file(data_dir: Path, split: str) -> Path:
    for suffix in _BUILDERS:
        candidate = data_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataUnavailable(
        f"no {split} split in {data_dir}: expected {split}.jsonl, {split}.csv or {split}.tsv"
    )


def data_source(spec: TaskSpec, data_dir: str | Path | None) -> str:
    """Where a run's data came from, as its manifest records it (`details.data`)."""
    return str(data_dir) if data_dir is not None else spec.hub_dataset


def load_split(spec: TaskSpec, split: str, data_dir: str | Path | None = None,
               samples: int | None = None, seed: int = 0):
    """One split of a task as a `datasets.Dataset` with columns text[, text_pair], label."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if data_dir is not None:
        directory = sample_dir(spec.name) if str(data_dir) == SAMPLE else Path(data_dir).expanduser()
        path = find_split_file(directory, split)
        kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        if path.suffix == ".tsv":  # GLUE's TSVs contain bare quotes; never treat them as quoting
            kwargs["quoting"] = 3
        ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train", **kwargs)
    elif spec.hub_dataset:
        try:
            ds = datasets.load_dataset(spec.hub_dataset, spec.hub_config, split=split)
        except Exception as exc:  # offline, hub down, unknown split: one line, not a trace
            raise DataUnavailable(
                f"cannot load {spec.hub_dataset}/{spec.hub_config} [{split}] from the hub "
                f"({type(exc).__name__}); pass --data-dir with {split}.jsonl/.csv/.tsv files"
            ) from exc
    else:
        raise DataUnavailable(f"task {spec.name!r} has no hub dataset: pass --data-dir")
    ds = _normalise(ds, spec, split)
    if samples is not None and samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(samples))
    return ds


def _normalise(ds, spec: TaskSpec, split: str):
    fields = [spec.text_field] + ([spec.text_pair_field] if spec.text_pair_field else []) + [spec.label_field]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise InvalidArgument(
            f"{spec.name} [{split}] lacks field(s) {', '.join(missing)}; columns are {', '.join(ds.column_names)}"
        )
    rename = {spec.text_field: "text", spec.label_field: "label"}
    if spec.text_pair_field:
        rename[spec.text_pair_field] = "text_pair"
    ds = ds.select_columns(fields).rename_columns(rename)
    return ds.map(_label_mapper(spec, split), batched=True)


def _label_mapper(spec: TaskSpec, split: str):
    index = {name: i for i, name in enumerate(spec.labels)}

    def convert(batch):
        labels = []
        for value in batch["label"]:
            if spec.is_regression:
                labels.append(float(value))
            elif isinstance(value, str) and value in index:
                labels.append(index[value])
            elif isinstance(value, (int, str)) and _is_index(str(value)) and 0 <= int(value) < len(index):
                labels.append(int(value))
            else:
                raise InvalidArgument(
                    f"{spec.name} [{split}]: label {value!r} is not one of {spec.labels} "
                    f"or an index below {len(spec.labels)} (unlabelled test splits cannot be scored)"
                )
        batch["label"] = labels
        return batch

    return convert


def _label_values(data_dir: str | Path, label_field: str, split: str = "train") -> tuple[Path, set[str]]:
    import datasets

    path = find_split_file(Path(data_dir).expanduser(), split)
    kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
    ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train", **kwargs)
    if label_field not in ds.column_names:
        raise InvalidArgument(f"{path} has no field {label_field!r}; columns are {', '.join(ds.column_names)}")
    return path, {str(v) for v in ds[label_field]}


def _is_index(value: str) -> bool:
    return value.isascii() and value.lstrip("-").isdigit()


def infer_labels(data_dir: str | Path, label_field: str, split: str = "train") -> list[str]:
    """Label names for a custom task: the sorted distinct values of its training labels."""
    _, values = _label_values(data_dir, label_field, split)
    numeric = all(_is_index(v) for v in values)
    return sorted(values, key=int) if numeric else sorted(values)


def check_labels(data_dir: str | Path, label_field: str, names: list[str], split: str = "train") -> None:
    """The label names a user gave must be what the training data holds: its label values
    themselves, or — for integer labels — one name per index 0…n-1; an empty list
    (regression) needs numbers. Anything else would train a head of the wrong shape."""
    path, values = _label_values(data_dir, label_field, split)
    shown = ", ".join(sorted(values, key=lambda v: (len(v), v))[:10]) + (", …" if len(values) > 10 else "")
    if not names:
        try:
            [float(v) for v in values]
        except ValueError:
            raise InvalidArgument(f"--labels regression, but {path} holds non-numeric labels ({shown})") from None
        return
    if all(_is_index(v) for v in values):
        expected = {str(i) for i in range(len(names))}
        if values != expected:
            raise InvalidArgument(
                f"--labels names {len(names)} classes ({', '.join(names)}), but the labels in {path} are {shown} "
                f"({len(values)} distinct): give one name per label index 0…{len(values) - 1}")
        return
    if values != set(names):
        missing, unknown = set(names) - values, values - set(names)
        raise InvalidArgument(
            f"--labels {', '.join(names)} does not match the labels in {path} ({shown})"
            + (f"; not in the data: {', '.join(sorted(missing))}" if missing else "")
            + (f"; not named: {', '.join(sorted(unknown)[:10])}" if unknown else ""))
