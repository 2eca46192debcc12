"""Score a loaded task on a data split through the runtime: the same path serving takes (an
embedding task by the Spearman correlation of its pairs' cosine similarity with their labels)."""

from __future__ import annotations

import numpy as np
import torch

from ticketserve.core.model import predictions
from ticketserve.core.tasks import compute_metrics
from ticketserve.runtime.executor import LoadedTask, Runtime


def evaluate(runtime: Runtime, task: LoadedTask, dataset, batch_size: int = 128) -> dict[str, float]:
    spec = task.spec
    has_pair = "text_pair" in dataset.column_names
    order = np.argsort([len(t) for t in list(dataset["text"])])  # similar lengths per batch: less padding
    preds, refs = [], []
    for start in range(0, len(order), batch_size):
        rows = dataset.select(order[start:start + batch_size].tolist())
        if spec.type == "embedding":  # each text of a pair embedded alone, as a request would: (B, 2, d)
            sides = [runtime.logits([task] * len(rows), runtime.tokenize(list(rows[column])))
                     for column in ("text", "text_pair")]
            logits = torch.stack([torch.stack(side) for side in sides], 1)
        else:
            inputs = runtime.tokenize(list(rows["text"]), list(rows["text_pair"]) if has_pair else None)
            logits = torch.stack(runtime.logits([task] * len(rows), inputs))
        preds.append(predictions(spec, logits).float().cpu().numpy())
        refs.append(np.asarray(list(rows["label"]), dtype=np.float32))
    return compute_metrics(spec, np.concatenate(preds), np.concatenate(refs))
