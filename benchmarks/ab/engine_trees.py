"""Before/after a refactor: the engine's mixed-batch workloads on one checkout's code (put first
on sys.path), to run alternately on two checkouts (e.g. a `git worktree` of the old commit):

    for tree in OLD NEW; do python benchmarks/ab/engine_trees.py $tree ticketserve/core/samples/sst2/validation.jsonl; done

Prints JSON: examples/s per engine and ratios to the plain backbone, best of the passes. Knows
the package layout before (02e7579) and after the one-package refactor. Results of that
comparison: results/layout-ab.jsonl."""
import json
import random
import sys
import time

tree = sys.argv[1]
sys.path.insert(0, tree)
import torch

try:  # after the refactor
    from ticketserve.core.artifact import Artifact
    from ticketserve.core.backbone import dense_matrices, load_backbone
    from ticketserve.core.kinds.structure_mask import to_tensors
    from ticketserve.core.tasks import get_task
    from ticketserve.registry import ArtifactVersion, HeadConfig, Manifest
    from ticketserve.runtime.executor import Runtime
    NEW = True
except ImportError:
    from registry import ArtifactVersion, HeadConfig, Manifest
    from ticketserve.artifact import Artifact
    from ticketserve.backbone import dense_matrices, load_backbone
    from ticketserve.kinds.structure_mask import to_tensors
    from ticketserve.tasks import get_task

    from ticketserve.runtime import Runtime
    NEW = False
import ticketserve

assert str(ticketserve.__file__).startswith(tree), ticketserve.__file__

TASKS, BATCH, BATCHES, PASSES = 100, 32, 8, 3
texts = [json.loads(l)["sentence"] for l in open(sys.argv[2]).read().splitlines()]

def artifact(backbone, name, kind, tensors, seed):
    g = torch.Generator().manual_seed(seed)
    head = {"head.weight": torch.randn(2, backbone.config.hidden_size, generator=g), "head.bias": torch.randn(2, generator=g)}
    manifest = Manifest(name=name, kind=kind, method="ab", task=get_task("sst2"), head=HeadConfig(), backbone=backbone.ref())
    return Artifact(ArtifactVersion(name, 1, "sha256:" + "0" * 64), manifest, tensors | head)

def rows(backbone, seed):
    g = torch.Generator().manual_seed(seed); t = {}
    for n, m in dense_matrices(backbone.model).items():
        idx = torch.cat([torch.randint(0, m.in_features, (1,), generator=g), torch.tensor([m.in_features])]).int()
        t[f"{n}.index"], t[f"{n}.delta"] = idx, torch.randn(2, m.out_features, generator=g) * 0.01
    return t

def gates(backbone, seed):
    c = backbone.config; g = torch.Generator().manual_seed(seed)
    keep = torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=g) > 0.2; keep[:, 0] = True
    return to_tensors(keep, torch.rand(c.num_hidden_layers, generator=g) > 0.1)

engines = {}
backbone = load_backbone()
rng = random.Random(0)
work = []
for _ in range(BATCHES):
    batch = rng.sample(texts, BATCH)
    work.append((backbone.tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt"),
                 [rng.randrange(TASKS) for _ in batch]))
engines["plain"] = lambda inputs, tasks, m=backbone.model: m(**inputs)
for kind, make in (("row_delta", rows), ("structure_mask", gates)):
    b = load_backbone()
    runtime = Runtime(b, device="cpu")
    loaded = [runtime.add(artifact(b, f"{kind}-{i}", kind, make(b, i), i)) for i in range(TASKS)]
    if NEW:
        engines[kind] = lambda inputs, tasks, r=runtime, l=loaded: r.logits([l[t] for t in tasks], inputs)
    else:
        engines[kind] = lambda inputs, tasks, r=runtime, l=loaded: r.logits([l[t].name for t in tasks], inputs)
best = {name: 0.0 for name in engines}
with torch.inference_mode():
    for name, run in engines.items():  # warm-up
        run(*work[0])
    for _ in range(PASSES):
        for name, run in engines.items():
            started = time.perf_counter()
            for inputs, tasks in work:
                run(inputs, tasks)
            best[name] = max(best[name], BATCH * BATCHES / (time.perf_counter() - started))
print(json.dumps({"tree": tree, "examples_per_s": best, "vs_plain": {k: v / best["plain"] for k, v in best.items()}}))
