"""Embedding and reranking tasks on the bundled MiniLM (itself a sentence-embedding model):
how much of the gap between the plain backbone and full fine-tuning each method closes on
STS-B, at what bytes, and how fast 100 mixed embedding tasks serve.

  1. throughput: 100 mixed embedding tasks (Dominant-1 row deltas; LoRA r=8) ÷ the plain
     backbone, interleaved passes over the same batches (benchmarks/system/serving.py's way)
  2. the plain backbone's own embeddings (imported from its sentence-transformers directory),
     STS-B validation Spearman of cosine similarity (`ticketserve eval`)
  3. every method (full, bitfit, dominant, random, lora, supermask) trained as an embedding task
     on STS-B train (5,749 scored pairs, CoSENT), seeds 42, 43, 44, at its default rate
  4. reranking on a set built from STS-B validation: each sentence1 whose pair scores ≥ 4 is a
     query, its sentence2 the relevant document among the 9 other pairs' second sentences that
     share the most words with the query (hard negatives);
     MRR@10 and nDCG@10 of cross-encoders (bitfit, lora, full; BCE on scores / 5, seed 42) and
     of the embedding tasks used as bi-encoders (cosine)
  5. benchmarks/studies/embeddings.md

Resumable: a run already in results/embeddings.jsonl is not rerun.

    python -m benchmarks.studies.embeddings [--jobs 2] [--epochs 2] [--report-only]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from benchmarks import common
from benchmarks.studies.quality import REGISTRY, append, cli, matching, mean_sd, run_stage, set_jobs, train_record

HERE = Path(__file__).parent
RESULTS = common.RESULTS / "embeddings.jsonl"
REPORT = HERE / "embeddings.md"
STSB = common.GLUE / "stsb"
METHODS = ("full", "bitfit", "dominant", "random", "lora", "supermask")
RERANKERS = ("bitfit", "lora", "full")
SEEDS = (42, 43, 44)
PLAIN = "minilm-embed"


def done(**match) -> list[dict]:
    return matching(RESULTS, **match)


# -- 1. throughput ---------------------------------------------------------------------------

def throughput(again: bool = False) -> None:
    if done(part="throughput") and not again:
        return
    from benchmarks.system import serving
    from ticketserve.core.tasks import as_type, get_task
    from ticketserve.registry import HeadConfig

    texts = [json.loads(line)["sentence1"] for line in (STSB / "validation.jsonl").read_text().splitlines()]
    for record in serving.typed_task_rates(as_type(get_task("stsb"), "embedding"), HeadConfig(normalize=True), texts):
        append(RESULTS, record)


# -- 2, 3. STS-B ---------------------------------------------------------------------------------

def plain_backbone() -> None:
    if done(part="stsb", method="plain backbone"):
        return
    from ticketserve.core.backbone import resolve_source

    source = resolve_source(None)[1]
    imported = cli("registry", "import", source, "--format", "sentence-transformers", "--name", PLAIN,
                   "--registry", str(REGISTRY))
    scored = cli("eval", imported["artifact"], "--data-dir", str(STSB), "--registry", str(REGISTRY))
    manifest = cli("registry", "show", imported["artifact"], "--registry", str(REGISTRY))["manifest"]
    append(RESULTS, {"part": "stsb", "method": "plain backbone", "seed": None, "metric": scored["metrics"]["spearman"],
                     "metrics": scored["metrics"], "artifact_bytes": manifest["payload_bytes"], "trainable_params": 0,
                     "artifact": imported["artifact"]})


def trained(method: str, seed: int, epochs: int, task_type: str = "embedding") -> dict:
    part = "stsb" if task_type == "embedding" else "reranker"
    found = done(part=part, method=method, seed=seed, epochs=epochs)
    if found:
        return found[0]
    record = train_record("stsb", method, seed, name=f"{part}-{method}-s{seed}-e{epochs}", epochs=epochs,
                          options={"task_type": task_type})
    record = {"part": part} | record
    append(RESULTS, record)
    return record


# -- 4. reranking ---------------------------------------------------------------------------------

def ranking_set(candidates: int = 10, threshold: float = 4.0) -> list[tuple[str, list[str]]]:
    """(query, documents) with the relevant document first: each STS-B validation pair scoring ≥ 4
    is a query and its answer; the other documents are the 9 second sentences of other pairs
    that share the most words with the query (hard negatives: random ones are ranked perfectly
    by every model, the plain backbone included)."""
    import re

    rows = [json.loads(line) for line in (STSB / "validation.jsonl").read_text().splitlines()]
    words = [set(re.findall(r"\w+", row["sentence2"].lower())) for row in rows]
    found = []
    for i, row in enumerate(rows):
        if row["label"] < threshold:
            continue
        query = set(re.findall(r"\w+", row["sentence1"].lower()))
        others = sorted((j for j, r in enumerate(rows) if j != i and r["sentence2"] not in (row["sentence2"], row["sentence1"])),
                        key=lambda j: (-len(query & words[j]) / max(len(query | words[j]), 1), j))
        negatives = list(dict.fromkeys(rows[j]["sentence2"] for j in others))[:candidates - 1]
        found.append((row["sentence1"], [row["sentence2"], *negatives]))
    return found


def ranking_metrics(scores: list[list[float]]) -> dict[str, float]:
    """MRR@10 and nDCG@10 with one relevant document (each list's first) per query."""
    import math

    ranks = [1 + sum(s > row[0] for s in row[1:]) for row in scores]
    return {"mrr@10": statistics.mean(1 / r if r <= 10 else 0 for r in ranks),
            "ndcg@10": statistics.mean(1 / math.log2(r + 1) if r <= 10 else 0 for r in ranks)}


def rank_with(artifact_ref: str) -> dict:
    """Rank the set with a published reranking (pairs) or embedding (cosine) task, in process."""
    import numpy as np

    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.registry import open_store
    from ticketserve.runtime.executor import Runtime

    store = open_store(str(REGISTRY))
    backbone = load_backbone()
    runtime = Runtime(backbone)
    task = runtime.add(artifact.load(store, artifact_ref, backbone))
    scores = []
    for query, documents in ranking_set():
        if task.spec.type == "embedding":
            vectors = np.array([p.embedding for p in runtime.predict([task] * (1 + len(documents)), [query, *documents])])
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            scores.append((vectors[1:] @ vectors[0]).tolist())
        else:
            scores.append([p.score for p in runtime.predict([task] * len(documents), [query] * len(documents), documents)])
    return ranking_metrics(scores)


NEGATIVES = "word overlap"  # how ranking_set draws them (records of an earlier set drew them at random)


def ranking(record: dict) -> None:
    if done(part="ranking", artifact=record["artifact"], negatives=NEGATIVES):
        return
    append(RESULTS, {"part": "ranking", "negatives": NEGATIVES, "method": record["method"], "as": record["part"],
                     "seed": record.get("seed"), "artifact": record["artifact"], "queries": len(ranking_set())}
           | rank_with(record["artifact"]))


# -- 5. report ------------------------------------------------------------------------------------

def report() -> None:
    from benchmarks.system import serving

    lines = ["# Embedding and reranking tasks (generated by `benchmarks/studies/embeddings.py`)", ""]
    lines += serving.typed_task_table(done(part="throughput"), "STS-B sentences")
    stsb = done(part="stsb")
    if stsb:
        plain = [r for r in stsb if r["method"] == "plain backbone"]
        full = [r["metric"] for r in stsb if r["method"] == "full"]
        lines += ["## STS-B validation (1,500 pairs): Spearman of cosine similarity", "",
                  "Trained on STS-B train (5,749 scored pairs) with CoSENT, each method at its default rate; "
                  "mean ± sd (runs). *Gap closed*: (method − plain backbone) ÷ (full fine-tuning − plain backbone).", "",
                  "| method | epochs | Spearman | gap closed | trainable params | artifact bytes | bytes ÷ full |",
                  "|---|---|---|---|---|---|---|"]
        full_bytes = next((r["artifact_bytes"] for r in stsb if r["method"] == "full"), None)
        base = plain[0]["metric"] if plain else None
        for method in ("plain backbone", *METHODS):
            rows = [r for r in stsb if r["method"] == method]
            if not rows:
                continue
            mean = statistics.mean(r["metric"] for r in rows)
            closed = (f"{(mean - base) / (statistics.mean(full) - base):.0%}"
                      if base is not None and full and method not in ("plain backbone", "full") else "–")
            share = f"{rows[0]['artifact_bytes'] / full_bytes:.2%}" if full_bytes else "–"
            lines.append(f"| {method} | {rows[0].get('epochs', '–')} | {mean_sd([r['metric'] for r in rows])} | {closed} "
                         f"| {rows[0]['trainable_params']:,} | {rows[0]['artifact_bytes']:,} | {share} |")
        lines.append("")
    ranked = done(part="ranking", negatives=NEGATIVES)
    if ranked:
        lines += [f"## Reranking: {ranked[0]['queries']} queries from STS-B validation, 1 relevant of 10 documents "
                  "(9 hard negatives: the other pairs' sentences sharing the most words with the query)",
                  "", "Cross-encoders trained on STS-B train (BCE on score / 5, seed 42); bi-encoders: the embedding "
                  "tasks above, by cosine similarity.", "",
                  "| model | as | MRR@10 | nDCG@10 |", "|---|---|---|---|"]
        for r in ranked:
            kind = "cross-encoder" if r["as"] == "reranker" else "bi-encoder"
            lines.append(f"| {r['method']} | {kind} | {r['mrr@10']:.4f} | {r['ndcg@10']:.4f} |")
        lines.append("")
    discussion = HERE / "embeddings_discussion.md"
    REPORT.write_text("\n".join(lines) + "\n" + (discussion.read_text() if discussion.exists() else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--remeasure", action="store_true", help="only measure the throughput again (after a "
                        "serving change; the report shows the newest run) and rewrite the report")
    args = parser.parse_args()
    if args.remeasure:
        throughput(again=True)
        return report()
    if not args.report_only:
        throughput()
        report()
        set_jobs(args.jobs)
        plain_backbone()
        seeds = [int(s) for s in args.seeds.split(",")]
        run_stage(args.jobs, (functools.partial(trained, m, seeds[0], args.epochs) for m in METHODS))
        report()
        rerankers = run_stage(args.jobs, (functools.partial(trained, m, 42, args.epochs, "reranking") for m in RERANKERS))
        for record in [*done(part="stsb", seed=42), *done(part="stsb", method="plain backbone"), *rerankers]:
            ranking(record)
        report()
        run_stage(args.jobs, (functools.partial(trained, m, seed, args.epochs) for seed in seeds[1:] for m in METHODS))
    report()


if __name__ == "__main__":
    main()
