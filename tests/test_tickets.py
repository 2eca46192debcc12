"""Dominant tickets: extraction on hand-made Δ, Jaccard, and find → train → publish → load → predict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import ByName
from ticketserve.core import artifact
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds.ticket import counts_of
from ticketserve.core.tasks import get_task
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers import get_method, tickets
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.run import train


def test_tilde_puts_input_features_in_rows_and_the_bias_last():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        linear.bias.copy_(torch.tensor([7.0, 8.0]))
    assert tickets.tilde(linear).tolist() == [[1, 4], [2, 5], [3, 6], [7, 8]]
    x = torch.tensor([[0.5, -1.0, 2.0]])
    torch.testing.assert_close(torch.cat([x, torch.ones(1, 1)], 1) @ tickets.tilde(linear), linear(x))


def test_extraction_on_a_hand_made_delta():
    sigma = 0.1
    # rows = dimensions of W̃ (3 inputs + bias), columns = outputs
    delta = torch.tensor([
        [0.5, 0.0, 0.2, 0.0],    # dim 0: 2 out-weighted
        [0.05, 0.1, 0.0, 0.0],   # dim 1: 0 (0.1 is not > σ)
        [-0.3, 0.0, 0.0, 0.15],  # dim 2: 2 (ties with dim 0 → lower index first)
        [0.2, 0.2, -0.2, 0.0],   # bias: 3
    ])
    counts = tickets.count_outweighted(delta, sigma)
    assert counts.tolist() == [2, 0, 2, 3]
    assert tickets.rank(counts) == [3, 0, 2]
    quiet = torch.zeros(4, 4)
    chosen = tickets.top_k({"m": counts, "quiet": tickets.count_outweighted(quiet, sigma)}, k=1)
    assert chosen == {"m": [3], "quiet": []}  # the bias dimension wins; no out-weighted → no rows
    assert tickets.top_k({"m": counts}, k=5) == {"m": [3, 0, 2]}  # at most k: only non-zero counts


def test_sigma_from_quantile_and_random_and_jaccard():
    deltas = [torch.arange(100, dtype=torch.float32).reshape(10, 10) / 100]
    assert tickets.sigma_from_quantile(deltas, 0.9) == pytest.approx(0.891)
    drawn = tickets.random_k({"a": 10, "b": 3}, k=2, seed=0)
    assert len(drawn["a"]) == 2 and len(set(drawn["b"])) == 2 and max(drawn["a"]) < 10
    assert drawn == tickets.random_k({"a": 10, "b": 3}, k=2, seed=0) != tickets.random_k({"a": 10, "b": 3}, 2, 1)
    assert tickets.jaccard({"a": [1, 2], "b": [0]}, {"a": [2], "b": [0, 1]}) == pytest.approx(2 / 4)


def test_search_options_are_validated():
    with pytest.raises(InvalidArgument, match="not both"):
        get_method("dominant", {"sigma": 1e-4, "sigma_quantile": 0.9})
    with pytest.raises(InvalidArgument, match="takes no option --k"):
        get_method("bitfit", {"k": 2})


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_find_train_publish_load_predict(store, tiny_checkpoints, arch):
    spec = get_task("sst2")
    backbone = load_backbone(str(tiny_checkpoints[arch]))
    theta0 = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    config = TrainConfig(train_samples=48, eval_samples=32, batch_size=8, epochs=1, seed=5)
    outcome = train("dominant", spec, backbone, config, store, "sample", show_progress=False,
                    options={"k": 2, "sigma_quantile": 0.995})
    # the search fine-tuned the encoder; Dominant-k restarted from θ0 and trained only its rows
    wrapped = dense_matrices(backbone.model)
    for key, value in theta0.items():
        assert torch.equal(backbone.model.state_dict()[key], value), key
    ticket = artifact.load(store, "sst2-ticket", load_backbone(str(tiny_checkpoints[arch])))
    assert ticket.manifest.kind == "ticket" and ticket.manifest.details["sigma_used"] > 0
    chosen = tickets.top_k(counts_of(ticket.tensors), 2)
    manifest = store.manifest(outcome.version)
    assert manifest.details["ticket"].startswith("sst2-ticket:1@sha256:")
    assert manifest.details["rows"] == sum(len(rows) for rows in chosen.values()) > 0
    assert manifest.trainable_params == sum(len(chosen[n]) * m.out_features for n, m in wrapped.items()) + 32 * 2 + 2

    fresh = load_backbone(str(tiny_checkpoints[arch]))
    task = artifact.load(store, outcome.version, fresh)
    for name, rows in chosen.items():
        got = task.tensors.get(f"{name}.index")
        assert sorted(got.tolist() if got is not None else []) == sorted(rows)
    runtime = ByName(Runtime(fresh, device="cpu"))
    runtime.add(task)
    assert runtime.predict(["sst2-dominant"], ["nice"])[0].label in spec.labels
    with pytest.raises(InvalidArgument, match="not a task"):
        runtime.add(ticket)


def test_transfer_reuses_a_ticket_and_random_k_has_the_same_shape(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    config = TrainConfig(train_samples=32, eval_samples=16, batch_size=8, epochs=1)
    train("ticket-search", get_task("sst2"), backbone, config, store, "sample", name="found-on-sst2",
          show_progress=False, options={"sigma_quantile": 0.99})
    transfer = train("dominant", get_task("sst2"), load_backbone(str(tiny_checkpoints["bert"])), config, store,
                     "sample", name="transferred", show_progress=False, options={"k": 1, "ticket": "found-on-sst2"})
    assert store.manifest(transfer.version).details["ticket"].startswith("found-on-sst2:1@")
    assert store.versions("sst2-ticket") == {}  # no second search ran
    random = train("random", get_task("sst2"), load_backbone(str(tiny_checkpoints["bert"])), config, store,
                   "sample", show_progress=False, options={"k": 3})
    manifest = store.manifest(random.version)
    assert manifest.details["rows"] == 3 * 12 and manifest.details["row_seed"] == config.seed


def test_ticket_show_compare_plot_and_peft_export_commands(tmp_path, tiny_checkpoints):
    import json

    from typer.testing import CliRunner

    from ticketserve.cli import app
    from ticketserve.registry import open_store

    registry = str(tmp_path / "registry")
    backbone = str(tiny_checkpoints["bert"])
    config = TrainConfig(train_samples=32, eval_samples=16, batch_size=8, epochs=1)
    for seed in (1, 2):
        train("ticket-search", get_task("sst2"), load_backbone(backbone), config.model_copy(update={"seed": seed}),
              open_store(registry), "sample", name=f"t{seed}", show_progress=False, options={"sigma_quantile": 0.99})
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [*args, "--registry", registry, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    shown = run("ticket", "show", "t1", "--k", "2")
    assert [row["layer"] for row in shown["layers"]] == [0, 1]
    assert all(len(cells) <= 2 for row in shown["layers"] for key, cells in row.items() if key != "layer")
    same = run("ticket", "compare", "t1", "t1:1", "--k", "2")
    assert same["jaccard"] == 1.0 and same["random_jaccard"] < 0.5
    other = run("ticket", "compare", "t1", "t2", "--k", "2")
    assert 0.0 <= other["jaccard"] <= 1.0
    figure = tmp_path / "ticket.png"
    run("ticket", "plot", "t1", "-o", str(figure))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = runner.invoke(app, ["registry", "export", "t1", "--format", "peft", "-o", str(tmp_path / "x"),
                                "--registry", registry])
    assert isinstance(wrong.exception, InvalidArgument) and "PEFT export takes row_delta" in str(wrong.exception)
