"""Where Dominant's ticket comes from (`--ticket auto|search|NAME`), the consensus of tickets,
the ticket shipped for the bundled MiniLM, and the search's L1 pull on the mean |Δ|."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import manifest_for
from ticketserve.cli import app
from ticketserve.core import artifact
from ticketserve.core.backbone import dense_matrices, load_backbone
from ticketserve.core.errors import InvalidArgument
from ticketserve.core.kinds import get_kind
from ticketserve.core.kinds.ticket import counts_of, to_tensors
from ticketserve.core.model import TaskModel
from ticketserve.core.tasks import get_task
from ticketserve.registry import HeadConfig, bundle_manifest, open_store
from ticketserve.trainers import get_method, ticket_sources
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.run import train

CONFIG = TrainConfig(train_samples=32, eval_samples=16, batch_size=8, epochs=1)


def random_counts(backbone, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, 50, (linear.in_features + 1,), generator=generator)
            for name, linear in dense_matrices(backbone.model).items()}


def publish_ticket(store, backbone, name: str, seed: int, created_at: datetime | None = None):
    manifest = manifest_for(backbone, name, kind="ticket")
    if created_at is not None:
        manifest = manifest.model_copy(update={"created_at": created_at})
    return artifact.publish(store, manifest, to_tensors(random_counts(backbone, seed)))


def test_consensus_sums_counts_and_refuses_foreign_or_single_tickets(store, tiny_checkpoints):
    bert, roberta = (load_backbone(str(tiny_checkpoints[a])) for a in ("bert", "roberta"))
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        publish_ticket(store, bert, name, seed)
    version = ticket_sources.publish_consensus(store, ["a", "b", "c"], "abc")
    found = artifact.load(store, version, bert, expect_kind="ticket")
    summed = {n: sum(random_counts(bert, s)[n] for s in (1, 2, 3)) for n in random_counts(bert, 1)}
    assert {n: c.tolist() for n, c in counts_of(found.tensors).items()} == {n: c.tolist() for n, c in summed.items()}
    assert found.manifest.details["tasks"] == ["sst2"] * 3 and found.manifest.backbone == bert.ref()
    assert found.manifest.details["sources"][0].startswith("a:1@sha256:")
    publish_ticket(store, roberta, "foreign", 4)
    with pytest.raises(InvalidArgument, match="different backbones"):
        ticket_sources.publish_consensus(store, ["a", "foreign"], "mixed")
    with pytest.raises(InvalidArgument, match="at least two"):
        ticket_sources.publish_consensus(store, ["a"], "one")


def test_newest_ticket_is_the_latest_created_on_this_backbone(store, tiny_checkpoints):
    bert, roberta = (load_backbone(str(tiny_checkpoints[a])) for a in ("bert", "roberta"))
    now = datetime.now(UTC)
    assert ticket_sources.newest_ticket(store, bert.fingerprint) is None
    publish_ticket(store, bert, "old", 1, now - timedelta(days=2))
    newer = publish_ticket(store, bert, "newer", 2, now - timedelta(days=1))
    publish_ticket(store, roberta, "other-backbone", 3, now)
    artifact.publish(store, manifest_for(bert, "not-a-ticket"), {})  # kinds other than ticket are skipped
    assert ticket_sources.newest_ticket(store, bert.fingerprint) == newer
    assert ticket_sources.auto_ticket(store, bert) == (newer, "registry")


def test_shipped_ticket_is_published_once_and_only_for_its_backbone(tmp_path, monkeypatch, tiny_checkpoints):
    bert, roberta = (load_backbone(str(tiny_checkpoints[a])) for a in ("bert", "roberta"))
    source = open_store(str(tmp_path / "source"))
    publish_ticket(source, bert, "tiny-ticket", 7)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    source.export_bundle("tiny-ticket", shipped / "tiny-ticket.tar")
    monkeypatch.setattr(ticket_sources, "SHIPPED", shipped)

    store = open_store(str(tmp_path / "user"))
    publish_ticket(store, bert, "users-own", 8)  # the shipped ticket still wins
    first = ticket_sources.auto_ticket(store, bert)
    assert first is not None and first[1] == "shipped" and first[0].name == "tiny-ticket"
    assert first[0].digest == bundle_manifest(shipped / "tiny-ticket.tar")[1] == source.resolve("tiny-ticket").digest
    assert ticket_sources.auto_ticket(store, bert) == first and store.versions("tiny-ticket") == {1: first[0].digest}
    assert ticket_sources.shipped_ticket(store, roberta.fingerprint) is None


def test_the_package_ships_a_ticket_for_the_bundled_minilm(tmp_path, minilm):
    bundles = sorted(ticket_sources.SHIPPED.glob("*.tar"))
    assert bundles, "no shipped ticket"
    manifest, _ = bundle_manifest(bundles[0])
    assert manifest.kind == "ticket" and manifest.backbone.fingerprint == minilm.fingerprint
    store = open_store(str(tmp_path / "registry"))
    version, source = ticket_sources.auto_ticket(store, minilm)
    found = artifact.load(store, version, minilm, expect_kind="ticket")  # checksums, backbone, kind all verified
    get_kind("ticket").validate(found.tensors, minilm.model)
    assert source == "shipped" and len(found.manifest.details["tasks"]) >= 2


def test_dominant_auto_uses_a_registry_ticket_and_search_forces_a_search(store, tiny_checkpoints, capsys):
    backbone = str(tiny_checkpoints["bert"])
    train("ticket-search", get_task("sst2"), load_backbone(backbone), CONFIG, store, "sample", name="found",
          show_progress=False)
    auto = train("dominant", get_task("sst2"), load_backbone(backbone), CONFIG, store, "sample", name="auto",
                 show_progress=True)
    details = store.manifest(auto.version).details
    assert details["ticket"].startswith("found:1@") and details["ticket_source"] == "registry"
    assert "searching" not in capsys.readouterr().err
    forced = train("dominant", get_task("sst2"), load_backbone(backbone), CONFIG.model_copy(update={"lr": 5e-2}), store,
                   "sample", name="forced", show_progress=False, options={"ticket": "search"})
    details = store.manifest(forced.version).details
    assert details["ticket"].startswith("sst2-ticket:1@") and details["ticket_source"] == "searched"
    search = store.manifest("sst2-ticket")
    assert search.hyperparameters["lr"] == get_method("ticket-search").default_lr  # not the rows' --lr


def test_dominant_auto_without_any_ticket_says_it_searches(store, tiny_checkpoints, capsys):
    outcome = train("dominant", get_task("sst2"), load_backbone(str(tiny_checkpoints["bert"])), CONFIG, store,
                    "sample", show_progress=True)
    assert store.manifest(outcome.version).details["ticket_source"] == "searched"
    err = " ".join(capsys.readouterr().err.split())
    assert "no ticket for backbone" in err and "about the cost of `--method full`" in err


def test_the_search_pulls_on_the_mean_absolute_change(tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    method = get_method("ticket-search", {"lambda_mean": 2.0})
    model = TaskModel(backbone.model, get_task("sst2"), HeadConfig())
    method.trainable(model, None)
    assert method.penalty(model).item() == 0.0
    matrices = dense_matrices(model.encoder)
    with torch.no_grad():
        for linear in matrices.values():
            linear.weight.add_(0.5)
    count = sum(m.weight.numel() + m.bias.numel() for m in matrices.values())
    weights = sum(m.weight.numel() for m in matrices.values())
    assert method.penalty(model).item() == pytest.approx(2.0 * 0.5 * weights / count)


def test_ticket_consensus_command(tmp_path, tiny_checkpoints):
    registry = str(tmp_path / "registry")
    bert = load_backbone(str(tiny_checkpoints["bert"]))
    for name, seed in (("a", 1), ("b", 2)):
        publish_ticket(open_store(registry), bert, name, seed)
    runner = CliRunner()
    result = runner.invoke(app, ["ticket", "consensus", "a", "b", "--name", "ab", "--registry", registry, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["artifact"] == "ab:1"
    shown = runner.invoke(app, ["ticket", "show", "ab", "--registry", registry])
    assert shown.exit_code == 0 and "consensus of a:1@" in " ".join(shown.output.split())
