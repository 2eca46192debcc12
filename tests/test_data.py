"""Task data sources and metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ticketserve.core.data import columns, glue_fields, infer_labels, label_file, load_split
from ticketserve.core.errors import DataUnavailable, InvalidArgument, NotFound
from ticketserve.core.tasks import GLUE_TASKS, compute_metrics, custom_task, get_task

PAIRS = [
    {"sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1},
    {"sentence1": "Stocks fell.", "sentence2": "It rained in Paris.", "label": 0},
    {"sentence1": "He left early.", "sentence2": "He departed early.", "label": 1},
]


def test_every_glue_task_has_a_complete_spec():
    assert {"sst2", "cola", "mrpc", "stsb", "qnli", "qqp", "rte", "mnli", "mnli-mm"} <= GLUE_TASKS.keys()
    assert get_task("stsb").is_regression and get_task("stsb").num_outputs == 1
    assert get_task("mnli").eval_split == "validation_matched"
    assert get_task("mnli-mm").eval_split == "validation_mismatched"
    assert get_task("cola").metric == "matthews" and get_task("mrpc").metric == "f1"
    with pytest.raises(NotFound, match="unknown task"):
        get_task("imdb")


def test_bundled_sample_loads_with_glue_labels():
    train = load_split(get_task("sst2"), "train", "sample")
    dev = load_split(get_task("sst2"), "validation", "sample")
    assert (len(train), len(dev)) == (2000, 872)
    assert train.column_names == ["text", "label"]
    assert sorted(set(dev["label"])) == [0, 1]


def test_train_samples_are_a_seeded_subset():
    spec = get_task("sst2")
    a = load_split(spec, "train", "sample", samples=50, seed=1)
    b = load_split(spec, "train", "sample", samples=50, seed=1)
    c = load_split(spec, "train", "sample", samples=50, seed=2)
    assert len(a) == 50 and list(a["text"]) == list(b["text"]) != list(c["text"])


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv"])
def test_local_files_in_glue_field_names(tmp_path, suffix):
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    else:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(PAIRS[0]), delimiter="\t" if suffix == "tsv" else ",")
            writer.writeheader()
            writer.writerows(PAIRS)
    ds = load_split(get_task("mrpc"), "train", tmp_path)
    assert ds.column_names == ["text", "text_pair", "label"]
    assert list(ds["text_pair"]) == [row["sentence2"] for row in PAIRS]
    assert list(ds["label"]) == [1, 0, 1]


def test_custom_task_with_string_labels(tmp_path):
    rows = [{"review": "loved it", "stars": "good"}, {"review": "hated it", "stars": "bad"}, {"review": "ok", "stars": "good"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = infer_labels(tmp_path, "stars")
    assert labels == ["bad", "good"]
    spec = custom_task("reviews", "review", None, "stars", labels)
    assert list(load_split(spec, "train", tmp_path)["label"]) == [1, 0, 1]
    with pytest.raises(InvalidArgument, match="lacks field"):
        load_split(custom_task("reviews", "body", None, "stars", labels), "train", tmp_path)
    with pytest.raises(InvalidArgument, match="not one of"):
        load_split(custom_task("reviews", "review", None, "stars", ["bad", "meh"]), "train", tmp_path)


def test_missing_split_and_offline_hub_are_one_line_errors(tmp_path):
    with pytest.raises(DataUnavailable, match="no validation split"):
        load_split(get_task("rte"), "validation", tmp_path)
    with pytest.raises(DataUnavailable, match="pass --data-dir") as info:
        load_split(get_task("rte"), "train")  # HF_DATASETS_OFFLINE=1 in tests
    assert "\n" not in str(info.value)
    with pytest.raises(DataUnavailable, match="no bundled sample"):
        load_split(get_task("rte"), "train", "sample")


def test_metrics_match_their_definitions():
    refs = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    preds = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    assert compute_metrics(get_task("sst2"), preds, refs) == {"accuracy": 0.75}
    mrpc = compute_metrics(get_task("mrpc"), preds, refs)
    assert mrpc["f1"] == pytest.approx(0.75) and mrpc["accuracy"] == 0.75
    assert compute_metrics(get_task("cola"), preds, refs)["matthews"] == pytest.approx(0.5)
    values = np.array([0.1, 0.4, 0.35, 0.8])
    stsb = compute_metrics(get_task("stsb"), values * 2 + 1, values)
    assert stsb["pearson"] == pytest.approx(1.0) and stsb["spearman"] == pytest.approx(1.0)


def test_given_labels_must_match_the_data(tmp_path):
    from ticketserve.core.data import check_labels

    rows = [{"review": "great", "stars": "good"}, {"review": "awful", "stars": "bad"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    check_labels(tmp_path, "stars", ["good", "bad"])  # any order: names are the data's own values
    with pytest.raises(InvalidArgument, match="not in the data: meh"):
        check_labels(tmp_path, "stars", ["good", "bad", "meh"])
    with pytest.raises(InvalidArgument, match="not named: bad"):
        check_labels(tmp_path, "stars", ["good"])


def test_glue_field_names_are_found_pairs_first():
    assert glue_fields(["sentence", "label"]) == ("sentence", None)
    assert glue_fields(["label", "question", "sentence", "idx"]) == ("question", "sentence")
    assert glue_fields(["sentence1", "sentence2", "label"]) == ("sentence1", "sentence2")
    assert glue_fields(["premise", "hypothesis", "label"]) == ("premise", "hypothesis")
    assert glue_fields(["body", "stars"]) is None


def test_label_names_from_a_file_beside_the_data(tmp_path):
    assert label_file(tmp_path) is None
    (tmp_path / "labels.txt").write_text("bad\ngood\n")
    assert label_file(tmp_path) == (tmp_path / "labels.txt", ["bad", "good"])
    (tmp_path / "labels.json").write_text('["neg", "pos"]')
    assert label_file(tmp_path)[1] == ["neg", "pos"]  # JSON first: the shared NER layout's form
    (tmp_path / "labels.json").write_text('{"neg": 0}')
    with pytest.raises(InvalidArgument, match="a list of label names"):
        label_file(tmp_path)


def test_csv_cells_stay_text(tmp_path):
    """"NA", "null" and "" are sentences here, not missing values (pandas' default would drop them)."""
    (tmp_path / "train.csv").write_text("sentence,label\nNA,1\nnull,0\n\"\",1\n")
    ds = load_split(get_task("sst2"), "train", tmp_path)
    assert list(ds["text"]) == ["NA", "null", ""] and list(ds["label"]) == [1, 0, 1]
    assert columns(tmp_path) == ["sentence", "label"]


def test_malformed_json_lines_are_one_line_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence": "ok", "label": 1}\n{"sentence": \n')
    with pytest.raises(InvalidArgument, match="not JSON lines"):
        load_split(get_task("sst2"), "train", tmp_path)
    (tmp_path / "train.jsonl").write_text('["a list", 1]\n')
    with pytest.raises(InvalidArgument, match="JSON object"):
        load_split(get_task("sst2"), "train", tmp_path)
