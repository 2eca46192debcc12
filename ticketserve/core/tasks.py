"""Task specs (GLUE, named-entity sets, custom) and their metrics."""

from __future__ import annotations

import numpy as np

from ticketserve.core.errors import InvalidArgument, NotFound
from ticketserve.core.tagging import entity_scores
from ticketserve.registry.manifest import TaskSpec

_ENTAIL = ["entailment", "not_entailment"]


def _glue(name: str, text: str, pair: str | None, labels: list[str], metric: str, extra=(), **kw) -> TaskSpec:
    return TaskSpec(
        name=name, text_field=text, text_pair_field=pair, labels=labels, metric=metric,
        extra_metrics=list(extra), hub_dataset="nyu-mll/glue", hub_config=kw.pop("hub_config", name), **kw,
    )


GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("sst2", "sentence", None, ["negative", "positive"], "accuracy"),
        _glue("cola", "sentence", None, ["unacceptable", "acceptable"], "matthews", ["accuracy"]),
        _glue("mrpc", "sentence1", "sentence2", ["not_equivalent", "equivalent"], "f1", ["accuracy"]),
        _glue("stsb", "sentence1", "sentence2", [], "pearson", ["spearman"]),
        _glue("qnli", "question", "sentence", _ENTAIL, "accuracy"),
        _glue("qqp", "question1", "question2", ["not_duplicate", "duplicate"], "accuracy", ["f1"]),
        _glue("rte", "sentence1", "sentence2", _ENTAIL, "accuracy"),
        _glue("mnli", "premise", "hypothesis", ["entailment", "neutral", "contradiction"], "accuracy",
              eval_split="validation_matched"),
        _glue("mnli-mm", "premise", "hypothesis", ["entailment", "neutral", "contradiction"], "accuracy",
              hub_config="mnli", eval_split="validation_mismatched"),
    )
}


def _ner(name: str, hub: str, labels: list[str]) -> TaskSpec:
    return TaskSpec(name=name, type="token_classification", text_field="tokens", label_field="ner_tags", labels=labels,
                    scheme="IOB2", metric="entity_f1", extra_metrics=["token_accuracy"], hub_dataset=hub)


def _iob2(*kinds: str) -> list[str]:
    return ["O", *(f"{prefix}-{kind}" for kind in kinds for prefix in "BI")]


# the label orders of the hub datasets (and of ../shared/data/ner's labels.json)
NER_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _ner("conll2003", "eriktks/conll2003", _iob2("PER", "ORG", "LOC", "MISC")),
        _ner("wnut17", "leondz/wnut_17", _iob2("corporation", "creative-work", "group", "location", "person", "product")),
    )
}
KNOWN_TASKS = GLUE_TASKS | NER_TASKS


def get_task(name: str) -> TaskSpec:
    try:
        return KNOWN_TASKS[name]
    except KeyError:
        raise NotFound(
            f"unknown task {name!r}: GLUE tasks are {', '.join(GLUE_TASKS)}, named-entity tasks "
            f"{', '.join(NER_TASKS)}; for your own data pass --text-field/--label-field with --data-dir"
        ) from None


def as_type(spec: TaskSpec, task_type: str) -> TaskSpec:
    """A pair task turned into another type over the same data (`train --type`): `embedding`
    embeds each text apart and is scored by the Spearman correlation of the pairs' cosine
    similarity with their labels (STS-B's scores, MRPC's paraphrase labels); `reranking` scores
    each pair with one relevance logit, trained against labels scaled to [0, 1]."""
    if task_type == spec.type:
        return spec
    if task_type not in ("embedding", "reranking"):
        raise InvalidArgument(f"--type {task_type}: a task turns into embedding or reranking (it is {spec.type})")
    if not spec.text_pair_field:
        raise InvalidArgument(f"task {spec.name} has single texts; {task_type} tasks train on text pairs")
    return spec.model_copy(update={"type": task_type, "labels": [], "metric": "spearman", "extra_metrics": ["pearson"]})


def custom_task(name: str, text_field: str, text_pair_field: str | None, label_field: str,
                labels: list[str], metric: str | None = None) -> TaskSpec:
    """A task over the user's own files; `labels` empty means regression."""
    return TaskSpec(
        name=name, text_field=text_field, text_pair_field=text_pair_field, label_field=label_field,
        labels=labels, metric=metric or ("pearson" if not labels else "accuracy"),
    )


def compute_metrics(spec: TaskSpec, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Primary + extra metrics. `predictions` are label ids, values, relevance logits or pairs'
    cosine similarities (what `model.predictions` gives); for token classification, one array of
    word label ids per sentence (pieces the labels ignore already dropped)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if len(references) == 0:
        raise InvalidArgument(f"no examples to score for task {spec.name}")
    if spec.type == "token_classification":
        names = [[[spec.labels[i] for i in sentence] for sentence in side] for side in (references, predictions)]
        found = entity_scores(*names)
        return {m: found[m] for m in [spec.metric, *spec.extra_metrics]}
    scorers = {
        "accuracy": lambda: accuracy_score(references, predictions),
        "f1": lambda: f1_score(references, predictions, average="binary" if len(spec.labels) == 2 else "macro"),
        "matthews": lambda: matthews_corrcoef(references, predictions),
        "pearson": lambda: pearsonr(predictions, references)[0],
        "spearman": lambda: spearmanr(predictions, references)[0],
    }
    return {m: float(np.nan_to_num(scorers[m]())) for m in [spec.metric, *spec.extra_metrics]}
