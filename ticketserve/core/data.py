"""Task data from the hub (`datasets`), a local directory of JSONL/CSV/TSV, or the bundled sample.

Whatever the source, rows come out with the task's GLUE field names and integer labels
(float for regression), ready to tokenize. Local files are read into memory, never through the
`datasets` cache: a user's private data leaves no copy outside their directory and the registry.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ticketserve.core.errors import DataUnavailable, InvalidArgument
from ticketserve.registry.manifest import TaskSpec

SAMPLE_DIR = Path(__file__).parent / "samples"
SAMPLE = "sample"  # --data-dir sample = the small sample committed inside the package
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
# the field names of GLUE's tasks, pairs first: a file with these (and `label`) needs no field flags
GLUE_FIELDS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
               ("premise", "hypothesis"), ("sentence", None))
LABEL_FILES = ("labels.json", "labels.txt")


def sample_dir(task: str) -> Path:
    path = SAMPLE_DIR / task
    if not path.is_dir():
        available = ", ".join(sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir()))
        raise DataUnavailable(f"no bundled sample for task {task!r} (bundled: {available})")
    return path


def find_split_file(data_dir: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        candidate = data_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataUnavailable(
        f"no {split} split in {data_dir}: expected {split}.jsonl, {split}.csv or {split}.tsv"
    )


def data_source(spec: TaskSpec, data_dir: str | Path | None) -> str:
    """Where a run's data came from, as its manifest records it (`details.data`)."""
    return str(data_dir) if data_dir is not None else spec.hub_dataset


def read_file(path: Path):
    """A local JSONL/JSON/CSV/TSV file as an in-memory `datasets.Dataset` (CSV/TSV cells stay
    strings: "NA" or "null" is a text, not a missing value). Read once per version of the file: a
    run asks its training file for its fields, its labels and its examples."""
    stat = path.stat()
    return _read_file(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_file(path: Path, mtime_ns: int, size: int):
    import datasets
    import pandas

    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if text.lstrip().startswith("[") else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path}: not JSON lines ({exc})") from None
        if not all(isinstance(row, dict) for row in rows):
            raise InvalidArgument(f"{path}: every line must be a JSON object of fields")
        return datasets.Dataset.from_list(rows)
    tsv = path.suffix == ".tsv"  # GLUE's TSVs contain bare quotes; never treat them as quoting
    frame = pandas.read_csv(path, sep="\t" if tsv else ",", quoting=3 if tsv else 0, dtype=str, keep_default_na=False)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def local_dir(spec_name: str, data_dir: str | Path) -> Path:
    return sample_dir(spec_name) if str(data_dir) == SAMPLE else Path(data_dir).expanduser()


def load_split(spec: TaskSpec, split: str, data_dir: str | Path | None = None,
               samples: int | None = None, seed: int = 0):
    """One split of a task as a `datasets.Dataset` with columns text[, text_pair], label;
    `samples`: a random subset of that many, drawn with `seed` (see `subset`)."""
    return subset(load_full_split(spec, split, data_dir), samples, seed)


def subset(ds, samples: int | None, seed: int):
    """`samples` examples drawn at random with `seed` (the run's --seed, which also seeds its
    initialisation), or all of them."""
    return ds.shuffle(seed=seed).select(range(samples)) if samples is not None and samples < len(ds) else ds


def load_full_split(spec: TaskSpec, split: str, data_dir: str | Path | None = None):
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if data_dir is not None:
        ds = read_file(find_split_file(local_dir(spec.name, data_dir), split))
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
    return _normalise(ds, spec, split)


def _normalise(ds, spec: TaskSpec, split: str):
    import datasets

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
    features = ds.features.copy()  # labels become numbers whatever the file held (CSV cells are strings)
    value = datasets.Value("float64" if spec.is_regression else "int64")
    features["label"] = datasets.Sequence(value) if spec.type == "token_classification" else value
    return ds.map(_label_mapper(spec, split), batched=True, features=features)


def _label_mapper(spec: TaskSpec, split: str):
    index = {name: i for i, name in enumerate(spec.labels)}

    def one(value):
        if spec.is_regression:
            return float(value)
        if isinstance(value, str) and value in index:
            return index[value]
        if isinstance(value, (int, str)) and _is_index(str(value)) and 0 <= int(value) < len(index):
            return int(value)
        raise InvalidArgument(
            f"{spec.name} [{split}]: label {value!r} is not one of {spec.labels} "
            f"or an index below {len(spec.labels)} (unlabelled test splits cannot be scored)"
        )

    def convert(batch):
        if spec.type == "token_classification":  # one label per word
            for text, labels in zip(batch["text"], batch["label"]):
                if not isinstance(text, list) or not isinstance(labels, list) or len(text) != len(labels):
                    raise InvalidArgument(f"{spec.name} [{split}]: each row needs a list of words and one label per "
                                          f"word ({spec.text_field}, {spec.label_field})")
            batch["label"] = [[one(value) for value in labels] for labels in batch["label"]]
        else:
            batch["label"] = [one(value) for value in batch["label"]]
        return batch

    return convert


def _label_values(data_dir: str | Path, label_field: str, split: str = "train") -> tuple[Path, set[str]]:
    path = find_split_file(Path(data_dir).expanduser(), split)
    ds = read_file(path)
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


def columns(data_dir: str | Path, split: str = "train") -> list[str]:
    """The fields of a local split's file."""
    return read_file(find_split_file(Path(data_dir).expanduser(), split)).column_names


def glue_fields(names: list[str]) -> tuple[str, str | None] | None:
    """The text (and pair) fields of a file that uses GLUE's field names, else None."""
    return next(((text, pair) for text, pair in GLUE_FIELDS if text in names and (pair is None or pair in names)), None)


def label_file(data_dir: str | Path) -> tuple[Path, list[str]] | None:
    """Label names from DIR/labels.json (a JSON list) or DIR/labels.txt (one per line), in the
    order of their indices; None when the directory has neither."""
    for name in LABEL_FILES:
        path = Path(data_dir).expanduser() / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            names = json.loads(text) if name.endswith(".json") else [line.strip() for line in text.splitlines() if line.strip()]
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise InvalidArgument(f"{path}: expected a list of label names")
            return path, names
    return None
