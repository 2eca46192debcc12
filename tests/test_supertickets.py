"""Super tickets and Ticket-Share: importance, the sweep, strict sharing, publish and serve."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ByName
from ticketserve.core import artifact
from ticketserve.core.backbone import load_backbone
from ticketserve.core.errors import BackboneMismatch, InvalidArgument
from ticketserve.core.tasks import custom_task, get_task
from ticketserve.runtime.executor import Runtime
from ticketserve.trainers.config import TrainConfig
from ticketserve.trainers.supertickets import SCORES_FFN, SCORES_HEADS, importance, keep_masks, score_fine_tuned, sweep
from ticketserve.trainers.ticketshare import StrictSharing, masked_slices, train_ticketshare

CONFIG = TrainConfig(train_samples=32, eval_samples=16, batch_size=8, epochs=1, seed=3)


def test_importance_finds_the_one_head_that_matters(tiny_checkpoints):
    from ticketserve.core.model import TaskModel
    from ticketserve.registry import HeadConfig

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    encoder = backbone.model
    width = encoder.config.hidden_size // encoder.config.num_attention_heads
    with torch.no_grad():  # only head 2 of layer 0 and head 1 of layer 1 reach the output projections
        for layer, keep in ((0, 2), (1, 1)):
            weight = encoder.encoder.layer[layer].attention.output.dense.weight
            survivor = weight[:, keep * width:(keep + 1) * width].clone()
            weight.zero_()
            weight[:, keep * width:(keep + 1) * width] = survivor * 3
    model = TaskModel(encoder, get_task("sst2"), HeadConfig(dropout=0.0))
    inputs = backbone.tokenizer(["one text", "and another, longer text"], padding=True, return_tensors="pt")
    heads, ffn = importance(model, [dict(inputs, labels=torch.tensor([0, 1]))])
    assert heads[0].argmax() == 2 and heads[1].argmax() == 1
    assert heads[0, 2] == pytest.approx(1.0) and heads[0].sum() == pytest.approx(1.0)  # L2-normalised, one non-zero
    assert (ffn > 0).all()


def test_strict_sharing_leaves_masked_structures_bit_identical(tiny_checkpoints):
    encoder = load_backbone(str(tiny_checkpoints["roberta"])).model
    layers, heads = encoder.config.num_hidden_layers, encoder.config.num_attention_heads
    keep_heads = torch.ones(layers, heads, dtype=torch.bool)
    keep_heads[0, 1] = False
    keep_ffn = torch.tensor([True, False])
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2, weight_decay=0.1)
    sharing = StrictSharing(optimizer, {"a": masked_slices(encoder, (keep_heads, keep_ffn)), "b": []})
    ids = torch.randint(0, 1000, (2, 6))

    def step(task: str) -> None:
        encoder(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        sharing.step(task)
        optimizer.zero_grad()

    step("b")  # task b uses everything: momentum now exists for every parameter
    slices = masked_slices(encoder, (keep_heads, keep_ffn))
    before = [p.data[index].clone() for p, index in slices]
    state_before = [optimizer.state[p]["exp_avg"][index].clone() for p, index in slices]
    untouched = encoder.encoder.layer[0].attention.self.query.weight[:8].clone()  # head 0: kept by task a
    step("a")
    for (param, index), value, momentum in zip(slices, before, state_before):
        assert torch.equal(param.data[index], value)
        assert torch.equal(optimizer.state[param]["exp_avg"][index], momentum)
    assert not torch.equal(encoder.encoder.layer[0].attention.self.query.weight[:8], untouched)
    step("b")
    assert not torch.equal(slices[0][0].data[slices[0][1]], before[0])  # task b still updates them


def test_sweep_publishes_masks_per_level_and_the_best(store, tiny_checkpoints):
    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    version = sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.5), ticket_type="losing",
                    show_progress=False)
    manifest = store.manifest(version)
    assert manifest.kind == "superticket" and manifest.details["ticket_type"] == "losing"
    assert [p["heads_pruned"] for p in manifest.details["levels"]] == [0, 4]
    keep_heads, keep_ffn = keep_masks(artifact.read(store, version).tensors, 0.5)
    assert (~keep_heads).sum() == 4 and (~keep_ffn).sum() == 1
    assert manifest.details["importance"].startswith("sst2-importance:1@")


def test_level_0_is_the_importance_runs_fine_tuning_not_a_second_one(store, tiny_checkpoints, monkeypatch):
    from ticketserve.trainers import supertickets as sweeping

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    real_train, trained = sweeping.train, []
    monkeypatch.setattr(sweeping, "train", lambda method, *a, **kw: trained.append(method) or real_train(method, *a, **kw))
    version = sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.5), show_progress=False)
    assert trained == ["importance", "gated-full"]
    level0 = store.manifest(version).details["levels"][0]
    assert level0["reused"] == "importance" and level0["metrics"] == store.manifest("sst2-importance").metrics
    layers, heads = backbone.config.num_hidden_layers, backbone.config.num_attention_heads
    retrained = real_train("gated-full", get_task("sst2"), backbone, CONFIG, store, "sample", show_progress=False,
                           options={"heads": [[1] * heads] * layers, "ffn": [1] * layers}, publish=False)
    assert retrained.fit.metrics == level0["metrics"]  # what the reuse rests on: the same run, to the bit
    trained.clear()  # importance trained with other settings is not level 0 of this sweep
    other = sweep(get_task("sst2"), backbone, CONFIG.model_copy(update={"lr": 1e-4}), store, "sample", levels=(0.0,),
                  importance_ref="sst2-importance", name="other", show_progress=False)
    assert trained == ["gated-full"] and "reused" not in store.manifest(other).details["levels"][0]


def test_importance_of_a_published_fine_tuning_is_that_of_fine_tuning_again(store, tiny_checkpoints, monkeypatch):
    from ticketserve.trainers import supertickets as sweeping

    backbone, spec = load_backbone(str(tiny_checkpoints["bert"])), get_task("sst2")
    theta0 = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    same_rate = CONFIG.model_copy(update={"lr": sweeping.Importance.default_lr})  # full FT's own default differs
    sweeping.train("full", spec, backbone, same_rate, store, "sample", name="ft", show_progress=False)
    backbone.model.load_state_dict(theta0)  # training fine-tunes the backbone in place
    again = sweeping.train("importance", spec, backbone, CONFIG, store, "sample", name="again", show_progress=False)
    backbone.model.load_state_dict(theta0)
    version, scores = score_fine_tuned("ft", spec, backbone, store, "sample", name="scored")
    for key in (SCORES_HEADS, SCORES_FFN):
        torch.testing.assert_close(scores[key], again.tensors[key], rtol=1e-5, atol=1e-7)
    assert store.manifest(version).metrics == store.manifest("again").metrics
    assert all(torch.equal(v, theta0[k]) for k, v in backbone.model.state_dict().items())  # scored on a copy

    trained = []
    monkeypatch.setattr(sweeping, "train", lambda method, *a, **kw: trained.append(method))
    swept = sweep(spec, backbone, CONFIG, store, "sample", levels=(0.0,), importance_ref="scored", show_progress=False)
    assert trained == [] and store.manifest(swept).details["levels"][0]["reused"] == "importance"
    with pytest.raises(InvalidArgument, match="trained on sample"):
        score_fine_tuned("ft", spec, backbone, store, "elsewhere")
    with pytest.raises(InvalidArgument, match="sst2 fine-tuning, not rte"):
        score_fine_tuned("ft", get_task("rte"), backbone, store, "sample")


def test_a_killed_sweep_resumes_from_its_last_finished_level(store, tiny_checkpoints, monkeypatch):
    from ticketserve.trainers import supertickets as sweeping

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    real_train, trained = sweeping.train, []

    def dies_at_level_50(method, *args, **kwargs):
        if method == "gated-full" and sum(1 - v for row in kwargs["options"]["heads"] for v in row) == 4:
            raise KeyboardInterrupt  # the process is killed while fine-tuning level 50 %
        trained.append(method)
        return real_train(method, *args, **kwargs)

    monkeypatch.setattr(sweeping, "train", dies_at_level_50)
    with pytest.raises(KeyboardInterrupt):
        sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.25, 0.5), name="sw", show_progress=False)
    checkpoint = store.manifest("sw")
    assert [p["level"] for p in checkpoint.details["levels"]] == [0.0, 0.25] and checkpoint.details["pending"] == [0.5]
    with pytest.raises(InvalidArgument, match="ticket type"):  # another sweep under that name is not mixed in
        sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.25, 0.5), ticket_type="random",
              name="sw", show_progress=False, resume=True)

    monkeypatch.setattr(sweeping, "train", real_train)
    trained.clear()
    monkeypatch.setattr(sweeping, "train", lambda method, *a, **kw: trained.append(method) or real_train(method, *a, **kw))
    version = sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.25, 0.5), name="sw",
                    show_progress=False, resume=True)
    assert trained == ["gated-full"]  # only the level that was in flight; importance and 0 %, 25 % reused
    done = store.manifest(version).details
    assert [p["level"] for p in done["levels"]] == [0.0, 0.25, 0.5] and done["pending"] == []
    assert done["levels"][:2] == checkpoint.details["levels"] and done["importance"] == checkpoint.details["importance"]
    assert list(store.versions("sw")) == [version.version]  # the checkpoints are gone
    tensors = artifact.read(store, version).tensors
    assert all(f"level-{level}.gates.heads" in tensors for level in (0, 25, 50))
    trained.clear()  # resuming a finished sweep returns it as it is
    assert sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.5), name="sw", show_progress=False,
                 resume=True) == version and trained == []


def test_ticketshare_publishes_a_shared_backbone_and_servable_masks(store, tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["bert"])
    backbone = load_backbone(path)
    flipped = tmp_path / "flipped"  # a second task: SST-2 sample sentences with labels swapped
    flipped.mkdir()
    from ticketserve.core.data import sample_dir

    for split in ("train", "validation"):
        lines = (sample_dir("sst2") / f"{split}.jsonl").read_text().splitlines()[:64]
        (flipped / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": r["sentence"], "label": 1 - r["label"]}) + "\n" for r in map(json.loads, lines)))
    other = custom_task("flipped", "text", None, "label", ["a", "b"])
    layers, heads = backbone.config.num_hidden_layers, backbone.config.num_attention_heads
    mask_a = (torch.ones(layers, heads, dtype=torch.bool), torch.tensor([True, False]))
    mask_b = (torch.tensor([[True, False, True, True], [False, True, True, True]]), torch.ones(layers, dtype=torch.bool))
    outcome = train_ticketshare([get_task("sst2"), other], backbone, CONFIG, store, {"sst2": "sample", "flipped": flipped},
                                {"sst2": mask_a, "flipped": mask_b}, name="ts", show_progress=False)
    assert set(outcome.tasks) == {"sst2", "flipped"} and outcome.backbone.name == "ts-backbone"
    task_manifest = store.manifest(outcome.tasks["flipped"])
    assert task_manifest.kind == "structure_mask" and task_manifest.backbone.name == "registry:ts-backbone:1"

    shared = load_backbone("registry:ts-backbone", store=store)
    assert shared.fingerprint == task_manifest.backbone.fingerprint == store.manifest(outcome.backbone).details["fingerprint"]
    runtime = ByName(Runtime(shared, device="cpu"))
    for name in ("ts-sst2", "ts-flipped"):
        runtime.add(artifact.load(store, name, shared))
    texts = ["lovely", "awful", "so-so", "great fun"]
    names = ["ts-sst2", "ts-flipped", "ts-flipped", "ts-sst2"]
    mixed = runtime.logits(names, runtime.tokenize(texts))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], runtime.logits([name], runtime.tokenize([texts[i]]))[0], atol=1e-5, rtol=0)
    with pytest.raises(BackboneMismatch):
        artifact.load(store, "ts-sst2", load_backbone(path))

    # per-task fine-tuning afterwards starts from the task's shared encoder, head and mask: at
    # a vanishing rate it evaluates exactly as Ticket-Share did
    from typer.testing import CliRunner

    from ticketserve.cli import app

    settings = ["--train-samples", "32", "--eval-samples", "16", "--batch-size", "8", "--seed", "3",
                "--registry", str(tmp_path / "registry"), "--json"]
    result = CliRunner().invoke(app, ["train", "--method", "gated-full", "--structure", "ts-flipped", "--data-dir",
                                      str(flipped), "--max-steps", "1", "--lr", "1e-12", "--name", "ts-flipped-ft", *settings])
    assert result.exit_code == 0, result.output
    tuned = json.loads(result.output)
    assert tuned["task"] == "flipped" and tuned["metrics"] == outcome.metrics["flipped"]
    manifest = store.manifest(store.resolve(tuned["artifact"]))
    assert manifest.backbone.fingerprint == shared.fingerprint and manifest.kind == "full"
    assert manifest.details["structure"] == f"{outcome.tasks['flipped']}@{outcome.tasks['flipped'].digest}"
    wrong_task = CliRunner().invoke(app, ["train", "--method", "gated-full", "--structure", "ts-flipped", "--task", "sst2",
                                          "--data-dir", "sample", "--max-steps", "1", *settings])
    assert isinstance(wrong_task.exception, InvalidArgument) and "masks flipped, not sst2" in str(wrong_task.exception)
    wrong_backbone = CliRunner().invoke(app, ["train", "--method", "gated-full", "--structure", "ts-sst2", "--backbone", path,
                                              "--data-dir", "sample", "--max-steps", "1", *settings])
    assert isinstance(wrong_backbone.exception, BackboneMismatch)


def test_ticketshare_runs_as_a_registered_method_through_the_one_entry_point(store, tiny_checkpoints):
    """Ticket-Share with a given super ticket, and plain MTL, each one `train` call; both
    publish a shared encoder and a structure mask per task, and report them."""
    from ticketserve.trainers.run import train

    backbone = load_backbone(str(tiny_checkpoints["bert"]))
    swept = sweep(get_task("sst2"), backbone, CONFIG, store, "sample", levels=(0.0, 0.5), name="sst2-sweep",
                  show_progress=False)
    shared = train("ticketshare", None, backbone, CONFIG, store, "sample", name="ts", show_progress=False,
                   options={"tasks": "sst2", "superticket": [f"sst2={swept}"]})
    plain = train("ticketshare", None, load_backbone(str(tiny_checkpoints["bert"])), CONFIG, store, "sample",
                  name="mtl", show_progress=False, options={"tasks": "sst2", "plain": True})
    for outcome, prefix in ((shared, "ts"), (plain, "mtl")):
        assert [str(v).split(":")[0] for v in outcome.published] == [f"{prefix}-backbone", f"{prefix}-sst2"]
        assert outcome.summary["tasks"] == {"sst2": str(outcome.published[1])}
    kept = keep_masks(artifact.read(store, swept).tensors, store.manifest(swept).details["best_level"])
    mask = artifact.read(store, shared.published[1]).tensors
    assert torch.equal(mask["gates.heads"].bool(), kept[0]) and torch.equal(mask["gates.ffn"].bool(), kept[1])
    assert artifact.read(store, plain.published[1]).tensors["gates.heads"].all()  # plain MTL: every gate open


def test_importance_sweep_and_phase_plot_commands(tmp_path, tiny_checkpoints):
    from typer.testing import CliRunner

    from ticketserve.cli import app

    registry, backbone = str(tmp_path / "registry"), str(tiny_checkpoints["roberta"])
    common = ["--task", "sst2", "--data-dir", "sample", "--backbone", backbone, "--train-samples", "16",
              "--max-steps", "1", "--registry", registry, "--json"]
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if result.output.strip().startswith(("{", "[")) else result.output

    scores = run("train", "--method", "importance", *common)
    assert len(scores["layers"]) == 2 and all(len(r["heads"]) == 4 for r in scores["layers"])
    tuned = run("train", "--method", "full", "--name", "ft", "--eval-samples", "16", *common)
    rescored = run("train", "--method", "importance", "--fine-tuned", tuned["artifact"], "--name", "from-ft", *common)
    assert rescored["artifact"] == "from-ft:1" and len(rescored["layers"]) == 2
    for kind in ("winning", "losing"):
        swept = run("train", "--method", "superticket", "--levels", "0,50", "--ticket-type", kind,
                    "--importance", "sst2-importance", "--eval-samples", "16", *common)
        assert [p["heads_pruned"] for p in swept["levels"]] == [0, 4]
        resumed = run("train", "--method", "superticket", "--levels", "0,50", "--ticket-type", kind, "--resume",
                      "--importance", "sst2-importance", "--eval-samples", "16", *common)
        assert resumed["artifact"] == swept["artifact"]  # finished: nothing is retrained or republished
    figure = tmp_path / "phase.png"
    plotted = run("ticket", "plot-phase", "sst2-superticket-winning", "sst2-superticket-losing", "-o", str(figure),
                  "--registry", registry, "--json")
    assert len(plotted["curves"]) == 2 and figure.read_bytes()[:4] == b"\x89PNG"
