"""A row_delta exported as a PEFT LoRA adapter loads with stock peft and reproduces our outputs."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModel

from tests.helpers import in_memory_artifact, random_row_delta
from ticketserve.core.routing import Routing, route
from ticketserve.formats.peft import export_peft
from ticketserve.runtime.executor import Runtime

TEXTS = ["the acting is superb", "two hours I will never get back", "meh"]


def test_peft_adapter_reproduces_the_served_outputs(tiny_backbone, tmp_path):
    tensors = random_row_delta(tiny_backbone, k=3)
    only_bias = next(name for name in (k.removesuffix(".index") for k in tensors) if name.endswith("output.dense"))
    tensors[f"{only_bias}.index"] = tensors[f"{only_bias}.index"][-1:]  # a matrix with just its bias row
    tensors[f"{only_bias}.delta"] = tensors[f"{only_bias}.delta"][-1:]
    task = in_memory_artifact(tiny_backbone, "exported", tensors)
    export_peft(task, tiny_backbone, tmp_path / "adapter")

    stock = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone.source, add_pooling_layer=False),
                                      tmp_path / "adapter").eval()
    runtime = Runtime(tiny_backbone, device="cpu")
    loaded = runtime.add(task)
    inputs = runtime.tokenize(TEXTS)
    with torch.no_grad(), route(Routing.single(loaded.slot, len(TEXTS))):
        ours = runtime.encoder(**inputs).last_hidden_state
    with torch.no_grad():
        theirs = stock(**inputs).last_hidden_state
        plain = AutoModel.from_pretrained(tiny_backbone.source, add_pooling_layer=False)(**inputs).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 1e-3
