"""A row_delta exported as a PEFT LoRA adapter loads with stock peft and reproduces our outputs."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModel

from tests.helpers import in_memory_artifact, random_row_delta
from ticketserve.core.routing import Routing
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
    with torch.no_grad():
        ours = runtime.backend.hidden([loaded], inputs, Routing.single(loaded.slot, len(TEXTS)))
    with torch.no_grad():
        theirs = stock(**inputs).last_hidden_state
        plain = AutoModel.from_pretrained(tiny_backbone.source, add_pooling_layer=False)(**inputs).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - plain).abs().max() > 1e-3


def test_adapter_is_portable_and_loads_on_stock_peft_without_warnings(tiny_backbone, tmp_path):
    """Exact target modules (the base's pooler `dense` is left alone, so a stock base model
    with its pooler loads without peft warning), the base named so another machine finds it,
    and a model card that says what the adapter is."""
    import json
    import warnings
    from pathlib import Path

    from ticketserve.core.backbone import load_backbone

    export_peft(in_memory_artifact(tiny_backbone, "portable", random_row_delta(tiny_backbone, k=2)), tiny_backbone,
                tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not Path(config["base_model_name_or_path"]).is_absolute()  # a local base: its path from the adapter
    assert (tmp_path / "adapter" / config["base_model_name_or_path"]).resolve() == Path(tiny_backbone.source).resolve()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_pooler = AutoModel.from_pretrained(tiny_backbone.source)  # stock, pooler included
        stock = PeftModel.from_pretrained(with_pooler, tmp_path / "adapter")
    assert not [w for w in caught if "peft" in str(w.filename) or "adapter" in str(w.message).lower()], \
        [str(w.message) for w in caught]
    wrapped = {name for name, module in stock.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and not any("pooler" in name for name in wrapped)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "sst2" in card and "negative, positive" in card and tiny_backbone.fingerprint in card and "row delta" in card

    minilm = load_backbone()
    export_peft(in_memory_artifact(minilm, "bundled", random_row_delta(minilm, k=1)), minilm, tmp_path / "bundled")
    assert json.loads((tmp_path / "bundled" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
