"""Score a loaded task on a data split through the runtime: the same path serving takes (an
embedding task by the Spearman correlation of its pairs' cosine similarity with their labels; a
token classification task on its sentences' words joined into texts, as training scores it)."""

from __future__ import annotations

import numpy as np
import torch

from ticketserve.core.model import predictions
from ticketserve.core.tasks import compute_metrics
from ticketserve.core.tagging import IGNORED, joined, piece_labels, word_ids
from ticketserve.runtime.executor import LoadedTask, Runtime
from ticketserve.runtime.tokenizing import OFFSETS


def evaluate(runtime: Runtime, task: LoadedTask, dataset, batch_size: int = 128) -> dict[str, float]:
    spec = task.spec
    has_pair = "text_pair" in dataset.column_names
    order = np.argsort([len(t) for t in list(dataset["text"])])  # similar lengths per batch: less padding
    preds, refs = [], []
    for start in range(0, len(order), batch_size):
        rows = dataset.select(order[start:start + batch_size].tolist())
        if spec.type == "token_classification":  # words joined and labelled on first pieces, as in training
            found, gold = _tagged(runtime, task, list(rows["text"]), list(rows["label"]))
            preds += found
            refs += gold
            continue
        if spec.type == "embedding":  # each text of a pair embedded alone, as a request would: (B, 2, d)
            sides = [runtime.logits([task] * len(rows), runtime.tokenize(list(rows[column])))
                     for column in ("text", "text_pair")]
            logits = torch.stack([torch.stack(side) for side in sides], 1)
        else:
            inputs = runtime.tokenize(list(rows["text"]), list(rows["text_pair"]) if has_pair else None)
            logits = torch.stack(runtime.logits([task] * len(rows), inputs))
        preds.append(predictions(spec, logits).float().cpu().numpy())
        refs.append(np.asarray(list(rows["label"]), dtype=np.float32))
    if spec.type == "token_classification":
        return compute_metrics(spec, preds, refs)
    return compute_metrics(spec, np.concatenate(preds), np.concatenate(refs))


def _tagged(runtime: Runtime, task: LoadedTask, sentences: list[list[str]], labels: list[list[int]]):
    """Each sentence's predicted and true word labels (words cut off by truncation left out)."""
    texts, spans = zip(*(joined(words) for words in sentences))
    features = runtime.tokenization.features(list(texts), spans=True)
    logits = runtime.logits([task] * len(texts), runtime.tokenization.pad(features, runtime.device))
    found, gold = [], []
    for row, feature, word_spans, word_labels in zip(logits, features, spans, labels):
        pieces = piece_labels(word_ids(feature[OFFSETS], word_spans), word_labels)
        kept = [i for i, label in enumerate(pieces) if label != IGNORED]
        found.append(row[kept].argmax(-1).cpu().numpy())
        gold.append(np.asarray([pieces[i] for i in kept]))
    return found, gold
