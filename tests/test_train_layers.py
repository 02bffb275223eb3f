"""``lora.layers: top N``: adapters on the top N decoder layers only, so autograd records nothing below them
(backward stops at the lowest adapted layer), with clear errors and unchanged fingerprints for older runs."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError
from test_train_helpers import TINY_MODEL, tiny_recipe

from embedkit.train.config import LoraSpec, ModelSpec
from embedkit.train.lora import LoraTargetError, wrap_lora
from embedkit.train.model import TrainModel
from embedkit.train.recipe import RecipeError, load_recipe


def _llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _adapted_layers(peft_model) -> dict[int, set[str]]:
    """Decoder layer index -> the projections holding a LoRA adapter."""
    found: dict[int, set[str]] = {}
    for name, _ in peft_model.named_parameters():
        match = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_A", name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


def _record_requires_grad(layers) -> list[bool]:
    """Whether each decoder layer's output is part of the autograd graph, filled in by the next forward."""
    seen: list[bool] = [None] * len(layers)

    def hook(index):
        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[index] = bool(hidden.requires_grad)
        return record

    for i, layer in enumerate(layers):
        layer.register_forward_hook(hook(i))
    return seen


@pytest.mark.parametrize(("value", "parsed"), [("all", "all"), ("top 2", 2), ("top  12", 12), (3, 3)])
def test_layers_accepts_all_top_n_and_n(value, parsed):
    assert LoraSpec(layers=value).layers == parsed


@pytest.mark.parametrize("value", ["top 0", 0, -2, "top -1", "bottom 3", "3", True, 2.5])
def test_layers_below_one_or_malformed_is_refused_in_one_line(tmp_path, value):
    with pytest.raises(ValidationError, match=r"must be all, 'top N' or an int N >= 1 \(LoRA on the top N decoder"):
        LoraSpec(layers=value)
    recipe = {"model": {"base": "x"}, "output_dir": str(tmp_path), "lora": {"layers": value},
              "stages": [{"objective": "simcse", "data": {"paths": ["t.txt"]}, "steps": 2}]}
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    line = [m for m in str(err.value).splitlines() if "lora.layers" in m]
    assert len(line) == 1 and "must be all, 'top N' or an int N >= 1" in line[0]


def test_top_n_adapts_exactly_the_top_n_layers():
    peft_model = wrap_lora(_llama(4), LoraSpec(r=2, alpha=4, layers="top 2"), base_name="tiny")
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert _adapted_layers(peft_model) == {2: projections, 3: projections}
    assert peft_model.peft_config["default"].layers_to_transform == [2, 3]
    everything = wrap_lora(_llama(4), LoraSpec(r=2, alpha=4), base_name="tiny")
    assert _adapted_layers(everything) == {i: projections for i in range(4)}


def test_more_layers_than_the_model_has_is_refused():
    with pytest.raises(LoraTargetError, match=r"^lora.layers=top 5 but LlamaModel has 4 decoder layers; use 1 to 4, "
                                              r"or all.$"):
        wrap_lora(_llama(4), LoraSpec(layers=5), base_name="tiny")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layers_below_the_adapters_get_no_autograd_graph(checkpointing):
    """The stories model (5 layers) with adapters on the top 2: the outputs of layers 0-2 do not require grad (no
    graph, so backward stops at layer 3), also with gradient checkpointing, whose input-grad hook would otherwise
    put every layer in the graph; every adapter still gets a gradient."""
    spec = ModelSpec(base=TINY_MODEL, dtype="float32", gradient_checkpointing=checkpointing)
    lora = LoraSpec(r=2, alpha=4, dropout=0.0, layers="top 2")
    model = TrainModel(spec, lora, needs_lm_head=True, init_seed=0)
    peft_model = model.wrap(lora)
    assert sorted(_adapted_layers(peft_model)) == [3, 4]
    seen = _record_requires_grad(model.base.layers)
    model.embedder.train()
    emb = model.embedder
    vectors = emb(*emb.collate(emb.tokenize(["Once upon a time there was a cat.", "The dog ran home."])))
    assert seen == [False, False, False, True, True]
    vectors.float().pow(2).sum().backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert model.base.get_input_embeddings().weight.grad is None


def test_all_layers_with_checkpointing_give_the_same_gradients():
    """Dropping the input-grad hook changes no adapter gradient (non-reentrant checkpointing does not need it)."""
    grads = []
    for checkpointing in (False, True):
        model = TrainModel(ModelSpec(base=TINY_MODEL, dtype="float32", gradient_checkpointing=checkpointing),
                           LoraSpec(), needs_lm_head=False, init_seed=0)
        torch.manual_seed(0)
        peft_model = model.wrap(LoraSpec(r=2, alpha=4, dropout=0.0))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        model.embedder.train()
        emb = model.embedder
        emb(*emb.collate(emb.tokenize(["Once upon a time there was a cat."]))).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_runs_saved_before_the_key_keep_their_fingerprint(tmp_path):
    """``lora.layers: all`` is left out of the fingerprint (recipe-level and stage-level lora), so older runs
    resume; the value is the one the code before this change gave this recipe."""
    recipe = {"model": {"base": "x"}, "output_dir": "o", "lora": {"r": 4},
              "stages": [{"objective": "simcse", "data": {"paths": ["t.txt"]}, "steps": 2, "lora": {"r": 8}}]}
    before = "c6e3bcf5036b4f8b"
    assert load_recipe(recipe).fingerprint() == before
    recipe["lora"]["layers"] = "all"
    recipe["stages"][0]["lora"]["layers"] = "all"
    assert load_recipe(recipe).fingerprint() == before
    recipe["lora"]["layers"] = "top 12"
    top = load_recipe(recipe)
    assert top.fingerprint() != before
    assert load_recipe({**recipe, "lora": {"r": 4, "layers": 12}}).fingerprint() == top.fingerprint()


def test_a_top_n_run_trains_and_its_final_embedder_loads(tmp_path):
    from embedkit import Embedder
    from embedkit.train import run_recipe

    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    recipe["lora"]["layers"] = "top 2"
    recipe["checkpoint"]["every"] = 0
    recipe["logging"].update({"plot": False, "tensorboard": False})
    final = run_recipe(recipe)
    vectors = Embedder.load(final).encode(["The dog ran home."])
    assert vectors.shape == (1, 64) and torch.isfinite(torch.as_tensor(vectors)).all()
