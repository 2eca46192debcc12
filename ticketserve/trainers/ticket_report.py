"""Reading tickets back for people: the paper's Table 1 layout, Jaccard against a random
floor, and the out-weighted-parameter map (the paper's Figure 2)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ticketserve.core import artifact
from ticketserve.core.backbone import MATRICES
from ticketserve.core.kinds.ticket import counts_of
from ticketserve.registry import Store
from ticketserve.trainers import tickets

SHORT = dict(zip(MATRICES, ("Q", "K", "V", "O", "FC1", "FC2")))


def load_ticket(store: Store, ref: str) -> tuple[artifact.Artifact, dict[str, torch.Tensor]]:
    found = artifact.read(store, ref, expect_kind="ticket")
    return found, counts_of(found.tensors)


def split_name(matrix: str) -> tuple[int, str]:
    """'encoder.layer.3.attention.self.query' → (3, 'Q')."""
    _, _, rest = matrix.partition("encoder.layer.")
    layer, _, suffix = rest.partition(".")
    return int(layer), SHORT[suffix]


def dimension_label(dim: int, size: int) -> str:
    return "bias" if dim == size - 1 else str(dim)


def top_table(counts: dict[str, torch.Tensor], k: int) -> list[dict]:
    """One row per layer: for each matrix the top-k dimensions with their counts."""
    rows: dict[int, dict] = {}
    for name, c in counts.items():
        layer, short = split_name(name)
        rows.setdefault(layer, {"layer": layer})[short] = [
            {"dim": dimension_label(d, len(c)), "count": int(c[d])} for d in tickets.rank(c)[:k]]
    return [rows[layer] for layer in sorted(rows)]


def random_floor(a: dict[str, list[int]], b: dict[str, list[int]], sizes: dict[str, int],
                 trials: int = 200, seed: int = 0) -> float:
    """Expected Jaccard of two random tickets with the same number of rows per matrix as a and b."""
    rng = random.Random(seed)
    total = 0.0
    for _ in range(trials):
        ra = {m: rng.sample(range(sizes[m]), len(a.get(m, []))) for m in sizes}
        rb = {m: rng.sample(range(sizes[m]), len(b.get(m, []))) for m in sizes}
        total += tickets.jaccard(ra, rb)
    return total / trials


def plot_counts(counts: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """A grid of layers × matrices; each panel shows out-weighted parameters per dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({split_name(n)[0] for n in counts})
    columns = list(SHORT.values())
    fig, axes = plt.subplots(len(layers), len(columns), figsize=(2.6 * len(columns), 1.3 * len(layers) + 1),
                             squeeze=False, sharey=True)
    peak = max(int(c.max()) for c in counts.values()) or 1
    for name, c in counts.items():
        layer, short = split_name(name)
        ax = axes[layers.index(layer)][columns.index(short)]
        ax.bar(range(len(c) - 1), c[:-1].numpy(), width=1.0, color="tab:blue")
        ax.bar([len(c) - 1], [int(c[-1])], width=max(len(c) // 60, 1), color="tab:red")  # the bias dimension
        ax.set_ylim(0, peak * 1.05)
        ax.set_xticks([])
        if layer == layers[0]:
            ax.set_title(short)
        if short == columns[0]:
            ax.set_ylabel(f"layer {layer}")
    fig.suptitle(f"{title}\nout-weighted parameters per dimension (red: bias)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distances(reference: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> list[dict]:
    """Per changed weight: L1 distance, L1 relative to the pre-trained weight, and angular
    distance arccos(cos(θ, θ0))/π (the supermask paper's Table 2 measures)."""
    rows = []
    for name, theta in sorted(tuned.items()):
        theta0 = reference[name].double().flatten()
        theta = theta.double().flatten()
        l1 = float((theta - theta0).abs().sum())
        # the angle from unit vectors' difference and sum: exact for the tiny angles of
        # fine-tuning, where arccos(cosine) rounds to 0
        a, b = theta / theta.norm(), theta0 / theta0.norm()
        angle = 2 * torch.atan2((a - b).norm(), (a + b).norm())
        rows.append({"tensor": name, "l1": l1, "relative_l1": l1 / float(theta0.abs().sum()),
                     "angular": float(angle / torch.pi)})
    return rows


def sparsity_grid(sparsity: dict[str, float]) -> list[dict]:
    """Per layer, the share of masked (zero) weights of each matrix."""
    rows: dict[int | str, dict] = {}
    for name, value in sparsity.items():
        if name.startswith("encoder.layer."):
            layer, short = split_name(name)
        else:
            layer, short = "emb", "word"
        rows.setdefault(layer, {"layer": layer})[short] = value
    return [rows[k] for k in sorted(rows, key=lambda k: (isinstance(k, int), k if isinstance(k, int) else -1))]


def plot_sparsity(grid: list[dict], path: Path, title: str) -> None:
    """Heat map of masked share per layer and matrix (the supermask paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [row for row in grid if isinstance(row["layer"], int)]
    columns = list(SHORT.values())
    values = np.array([[row.get(c, np.nan) for c in columns] for row in layers]) * 100
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(layers) + 1.5))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(layers)), [f"layer {row['layer']}" for row in layers])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, label="masked weights (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance_rows(tensors: dict[str, torch.Tensor]) -> list[dict]:
    heads, ffn = tensors["importance.heads"], tensors["importance.ffn"]
    return [{"layer": i, "heads": heads[i].tolist(), "ffn": float(ffn[i])} for i in range(len(ffn))]


def plot_phase(curves: list[dict], path: Path) -> None:
    """Dev metric against the share of heads pruned, one line per sweep (winning/random/losing).
    Pruning 0 % is the same run for every ticket type, so a sweep run without it borrows the
    unpruned point of one that has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"winning": "tab:green", "random": "tab:gray", "losing": "tab:red"}
    unpruned = next((p for c in curves for p in c["levels"] if p["level"] == 0), None)
    for curve in curves:
        points = sorted(curve["levels"], key=lambda p: p["level"])
        if unpruned and points and points[0]["level"] > 0:
            points.insert(0, unpruned)
        ax.plot([100 * p["level"] for p in points], [p["metric"] for p in points], marker="o",
                color=colors.get(curve["ticket_type"]), label=f"{curve['ticket_type']} ({curve['run']})")
    ax.set_xlabel("pruned heads and FFNs (%)")
    ax.set_ylabel(f"dev {curves[0]['metric']}" if curves else "dev metric")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
