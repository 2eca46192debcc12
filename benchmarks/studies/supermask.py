"""Supermasks at MiniLM scale (issue: Radiya-Dixit & Wang reproduction).

One command (hours on 2 CPU cores; never part of the tests):
  0. the score learning rate chosen on dev from a small grid (init sparsity 0, one task)
  1. supermask per task at each init sparsity → results/quality.jsonl (metric, final sparsity,
     artifact bytes, bits per masked weight, Bernoulli-sample mean ± std)
  2. the shuffled-weights control (§4.4): the same training on a copy of MiniLM whose
     matrices' entries are randomly permuted → results/quality.jsonl
  3. benchmarks/studies/supermask.md regenerated from the results (also: --report-only)

    python -m benchmarks.studies.supermask
    python -m benchmarks.studies.supermask --tasks mrpc --sparsities 0,0.5 --control-task mrpc
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from benchmarks.common import BENCHMARKS, GLUE, STUDY_REGISTRY
from benchmarks.studies.quality import (FIRST_DEFAULT_LR, QUALITY, REGISTRY, RESULTS, append, cli, read_jsonl,
                                        train_record)

HERE = Path(__file__).parent
REPORT = HERE / "supermask.md"
STUDY = "supermask"
SHUFFLED = BENCHMARKS / ".shuffled-minilm"


def shuffled_backbone(seed: int = 0) -> Path:
    """MiniLM with every dense matrix's entries permuted: same weight distribution, no structure."""
    import torch

    from ticketserve.core.backbone import dense_matrices, load_backbone

    if (SHUFFLED / "config.json").exists():
        return SHUFFLED
    backbone = load_backbone()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in dense_matrices(backbone.model).values():
            flat = linear.weight.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    backbone.model.save_pretrained(SHUFFLED)
    backbone.tokenizer.save_pretrained(SHUFFLED)
    return SHUFFLED


def _name(task: str, sparsity: float, seed: int, lr: float | None, control: bool) -> str:
    return (f"study-{task}-supermask-s{int(sparsity * 100)}-seed{seed}" + (f"-lr{lr:g}" if lr else "")
            + ("-shuffled" if control else ""))


def train(task: str, sparsity: float, seed: int, args, lr: float | None = None, control: bool = False) -> dict:
    name = _name(task, sparsity, seed, lr, control)
    previous = [r for r in read_jsonl(QUALITY) if r.get("artifact", "").split(":")[0] == name]
    if previous:
        return previous[-1]
    record = train_record(task, "supermask", seed, name=name, train_samples=args.train_samples.get(task),
                          epochs=args.epochs, lr=lr,
                          options={"init_sparsity": sparsity, "samples": args.samples, "head_lr": args.head_lr},
                          backbone=str(shuffled_backbone()) if control else None, data_root=args.data_root,
                          registry=args.registry)
    details = cli("registry", "show", record["artifact"], "--registry", str(args.registry))["manifest"]["details"]
    record |= {"study": STUDY, "init_sparsity": sparsity, "final_sparsity": details["sparsity"],
               "bits_per_masked_weight": details["bits_per_masked_weight"], "masked_weights": details["masked_weights"],
               "raw_mask_bytes": (details["masked_weights"] + 7) // 8, "sampled": details.get("sampled"),
               "shuffled_weights": control, "head_lr": args.head_lr}
    append(QUALITY, record)
    return record


def entropy(zeros: float) -> float:
    """Bits per weight of an i.i.d. mask with this share of zeros: what a perfect coder needs."""
    return 0.0 if zeros in (0.0, 1.0) else -(zeros * math.log2(zeros) + (1 - zeros) * math.log2(1 - zeros))


def others(record: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items() if k != record["metric_name"]) or "–"


def distance_section(records: list[dict]) -> list[str]:
    """How far full fine-tuning moves each matrix (angular distance ×1e-3, per layer): the
    paper's Table 2 measure, which the L0-close presets lean on."""
    from ticketserve.trainers.ticket_report import SHORT, split_name

    full = next((r for r in records if r["method"] == "full" and r["task"] == "mrpc"), None)
    if full is None:
        return []
    rows = cli("ticket", "distance", full["artifact"], "--registry", str(REGISTRY))["distances"]
    grid: dict[int, dict[str, float]] = {}
    for row in rows:
        matrix = row["tensor"].removeprefix("encoder.").removesuffix(".weight")
        if row["tensor"].endswith(".weight") and matrix.startswith("layer.") and matrix.split(".", 2)[2] in SHORT:
            layer, short = split_name("encoder." + matrix)
            grid.setdefault(layer, {})[short] = row["angular"]
    names = list(SHORT.values())
    return ["", f"Angular distance ×1e-3 between full fine-tuning ({full['artifact']}) and MiniLM, per matrix"
            " (`ticketserve ticket distance`):", "", "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
            *[f"| {layer} | " + " | ".join(f"{1e3 * grid[layer][n]:.2f}" for n in names) + " |" for layer in sorted(grid)]]


def sparsity_section(masks: list[dict]) -> list[str]:
    """Share of zeros per layer and matrix of each task's mask at init sparsity 0 (the paper's
    Figure 4), with the figure `ticketserve ticket sparsity` draws."""
    lines = []
    unmasked = [r for r in masks if not r["init_sparsity"] and not r["shuffled_weights"]]
    chosen = max(unmasked, key=lambda r: r["metric"] if r["task"] == "mrpc" else -1)["lr"] if unmasked else None
    for r in unmasked:
        if r["lr"] != chosen:
            continue
        figure = RESULTS / f"supermask-sparsity-{r['task']}.png"
        layers = cli("ticket", "sparsity", r["artifact"], "-o", str(figure), "--registry", str(REGISTRY))["layers"]
        names = [k for k in layers[0] if k != "layer"]
        lines += ["", f"Zeros per layer and matrix, {r['artifact']} (init sparsity 0):", "",
                  "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
                  *[f"| {row['layer']} | " + " | ".join(f"{row[n]:.2%}" for n in names) + " |" for row in layers],
                  "", f"![zeros per layer, {r['task']}](results/{figure.name})"]
    return lines


def coding_section(masks: list[dict]) -> list[str]:
    """Masks trained from a magnitude start, re-coded as their flips of that start (what the
    trainer ships since that codec exists; masks trained before it were coded on their own)."""
    from ticketserve.core import artifact
    from ticketserve.core.backbone import load_backbone
    from ticketserve.core.kinds.supermask import (
        MASK,
        decode_masks,
        encode_masks,
        magnitude_mask,
        masked_names,
    )
    from ticketserve.registry import open_store

    started = sorted((r for r in masks if r["init_sparsity"] and not r["shuffled_weights"]),
                     key=lambda r: (r["task"], r["init_sparsity"]))
    if not started:
        return []
    backbone, store = load_backbone(None), open_store(str(REGISTRY))
    params = dict(backbone.model.named_parameters())
    lines = ["", "Masks from a magnitude start, coded on their own vs as flips of the start (`<matrix>.reference`):", "",
             "| task | init sparsity | flipped vs start | bits/weight, own | bits/weight, flips |", "|---|---|---|---|---|"]
    for r in started:
        tensors = artifact.load(store, r["artifact"], backbone, expect_kind="supermask").tensors
        weights = {n: params[f"{n}.weight"] for n in masked_names(tensors)}
        masks_ = decode_masks(tensors, weights)
        dropped = {n: round(r["init_sparsity"] * w.numel()) for n, w in weights.items()}
        flipped = sum(int((masks_[n] ^ magnitude_mask(w, dropped[n])).sum()) for n, w in weights.items())
        recoded = encode_masks(masks_, weights, dropped)
        bits = 8 * sum(recoded[n + MASK].numel() for n in weights) / r["masked_weights"]
        lines.append(f"| {r['task']} | {r['init_sparsity']:.0%} | {flipped / r['masked_weights']:.2%} "
                     f"| {r['bits_per_masked_weight']:.3f} | {bits:.3f} |")
    return lines


def report() -> None:
    records = read_jsonl(QUALITY)
    masks = [r for r in records if r.get("study") == STUDY]
    lines = ["# Supermasks on MiniLM-L6 (generated by `benchmarks/studies/supermask.py`)", "",
             "Bundled MiniLM-L6, real GLUE dev sets, 2 CPU cores, 3 epochs; `lr` = scores' / head's learning rate.",
             "`final` = share of masked weights in the shipped deterministic mask; `sampled` = mean ± std of",
             "the metric over Bernoulli masks drawn from the trained scores; bytes = compressed masks + head;",
             "`entropy` = bits per weight an ideal coder needs for an i.i.d. mask with that share of zeros.", "",
             "| task | weights | lr | init sparsity | final sparsity | metric | other metrics | sampled | artifact bytes | raw mask bytes | bits/weight | entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(masks, key=lambda r: (r["task"], r["shuffled_weights"], r["init_sparsity"], r["lr"])):
        sampled = r.get("sampled")
        sampled_text = f"{sampled['mean']:.4f} ± {sampled['std']:.4f} (n={sampled['n']})" if sampled else "–"
        lines.append(f"| {r['task']} | {'shuffled' if r['shuffled_weights'] else 'pre-trained'} "
                     f"| {r['lr']:g} / {r.get('head_lr', r['lr']):g} | {r['init_sparsity']:.0%} "
                     f"| {r['final_sparsity']:.2%} | {r['metric']:.4f} | {others(r)} | {sampled_text} | {r['artifact_bytes']:,} "
                     f"| {r['raw_mask_bytes']:,} | {r['bits_per_masked_weight']:.3f} | {entropy(r['final_sparsity']):.3f} |")
    baselines = [r for r in records if (r["method"] in ("full", "bitfit") or (r["method"] == "dominant" and r.get("k") == 1
                                                                               and not r.get("transfer_from")))
                 and abs(r["lr"] - FIRST_DEFAULT_LR[r["method"]]) < 1e-12]
    if baselines:
        lines += ["", "Same-file baselines (default learning rates, mean over seeds):", "",
                  "| task | method | metric | runs | artifact bytes |", "|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in baselines:
            groups.setdefault((r["task"], r["method"] + ("-1" if r["method"] == "dominant" else "")), []).append(r)
        for (task, method), runs in sorted(groups.items()):
            lines.append(f"| {task} | {method} | {statistics.mean(r['metric'] for r in runs):.4f} | {len(runs)} "
                         f"| {runs[0]['artifact_bytes']:,} |")
    lines += coding_section(masks) + distance_section(records) + sparsity_section(masks)
    discussion = HERE / "supermask_discussion.md"
    REPORT.write_text("\n".join(lines) + "\n" + ("\n" + discussion.read_text() if discussion.exists() else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mrpc,rte,cola,sst2")
    parser.add_argument("--sparsities", default="0,0.1,0.3,0.5")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--score-lrs", default="0.05,0.1,0.2,0.5", help="grid for the scores' learning rate")
    parser.add_argument("--grid-task", default="mrpc")
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--control-task", default="mrpc", help="task for the shuffled-weights control ('' = skip)")
    parser.add_argument("--sst2-train-samples", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--data-root", type=Path, default=GLUE)
    parser.add_argument("--registry", type=Path, default=STUDY_REGISTRY)
    args = parser.parse_args()
    args.train_samples = {"sst2": args.sst2_train_samples}
    if not args.report_only:
        grid = [train(args.grid_task, 0.0, args.seed, args, lr) for lr in map(float, args.score_lrs.split(","))]
        lr = max(grid, key=lambda r: r["metric"])["lr"]
        for sparsity in map(float, args.sparsities.split(",")):  # every task at one sparsity before the next
            for task in args.tasks.split(","):
                train(task, sparsity, args.seed, args, lr)
            if sparsity == 0 and args.control_task:
                train(args.control_task, 0.0, args.seed, args, lr, control=True)
    report()


if __name__ == "__main__":
    main()
