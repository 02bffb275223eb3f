"""Units of training: LoRA targets per architecture, MNTP masking and loss, batch order, hooks, QLoRA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_helpers import TINY_MODEL, tiny_recipe

from embedkit.train.config import LoraSpec
from embedkit.train.data import BatchPlan, DataError, pack_blocks, shard
from embedkit.train.lora import LoraTargetError, resolve_targets, wrap_lora
from embedkit.train.negatives import register_negative_selector
from embedkit.train.objectives.base import row_rng
from embedkit.train.objectives.mntp import mask_block
from embedkit.train.recipe import load_recipe
from embedkit.train.trainer import Trainer, backward


def _tiny(kind: str):
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, Phi3Config, Phi3Model

    torch.manual_seed(0)
    if kind == "phi3":
        return Phi3Model(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
    if kind == "gpt2":
        return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2))


def test_lora_targets_per_architecture():
    assert resolve_targets(_tiny("llama"), "auto") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]
    assert resolve_targets(_tiny("phi3"), "auto") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_targets(_tiny("gpt2"), "auto") == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(LoraTargetError, match=r"\['q_proj'\] match no linear layer of Phi3Model .*qkv_proj"):
        resolve_targets(_tiny("phi3"), ["q_proj", "o_proj"])


def test_lora_fails_when_nothing_matches():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = type("C", (), {"model_type": "oddball"})()
    with pytest.raises(LoraTargetError, match=r"No LoRA target modules found for Sequential .*layers are: \['0'\]"):
        resolve_targets(model, "auto")


@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2"])
def test_wrap_trains_only_float32_adapters(kind):
    model = _tiny(kind).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = wrap_lora(model, LoraSpec(r=2, alpha=4), base_name="tiny-base")
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert peft_model.peft_config["default"].base_model_name_or_path == "tiny-base"
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    out.float().sum().backward()
    assert all(p.grad is not None for p in trainable.values())


def test_lora_dtype_model_keeps_bf16_adapters():
    model = _tiny("llama").to(torch.bfloat16)
    peft_model = wrap_lora(model, LoraSpec(r=2, alpha=4, dtype="model"), base_name="tiny-base")
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_lora_dtype_mixed_keeps_float32_adapters_and_computes_in_bf16():
    model = _tiny("llama").to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.manual_seed(0)
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, dtype="float32")
    reference = wrap_lora(copy.deepcopy(model), spec, base_name="tiny-base")
    torch.manual_seed(0)
    mixed = wrap_lora(model, LoraSpec(r=2, alpha=4, dropout=0.0, dtype="mixed"), base_name="tiny-base")
    trainable = {n: p for n, p in mixed.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    for name, param in reference.named_parameters():  # a non-zero adapter, so the LoRA path counts
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
            dict(mixed.named_parameters())[name].data.copy_(param.data)
    out = mixed(input_ids=ids).last_hidden_state
    assert out.dtype == torch.bfloat16
    ref = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out.float(), ref.float(), atol=0.05 * float(ref.abs().max()), rtol=0)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


def test_mask_block_bert_split_and_position_zero():
    rng = np.random.default_rng(0)
    ids = np.arange(1, 20001) % 90 + 10
    ids[0] = 1  # bos
    x, y = mask_block(ids, rng, ratio=0.2, strategy="bert", mask_id=5, vocab=100, special={1})
    chosen = y != -100
    assert y[0] == -100 and abs(chosen.mean() - 0.2) < 0.01
    assert np.array_equal(y[chosen], ids[chosen])
    masked = (x == 5) & chosen
    kept = (x == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.02 + 0.01  # random replacements can hit the same id
    x, y = mask_block(ids, np.random.default_rng(0), ratio=0.2, strategy="all_mask", mask_id=5, vocab=100,
                      special={1})
    assert np.all(x[y != -100] == 5) and np.array_equal(x[y == -100], ids[y == -100])


def test_pack_blocks_joins_with_separator_and_keeps_bos():
    blocks = pack_blocks([[1, 5, 6], [1, 7], [1, 8, 9, 10]], 4, separator=2, bos=1)
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 7, 2, 8], [1, 9, 10, 2]]


def test_batch_plan_is_a_pure_function_of_the_step():
    plan = BatchPlan(10, 4, seed=3)
    first = [plan.batch(s) for s in range(5)]
    again = BatchPlan(10, 4, seed=3)
    assert [again.batch(s) for s in (4, 0, 3)] == [first[4], first[0], first[3]]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # no repeats within an epoch
    grouped = BatchPlan(12, 3, seed=1, groups=["a"] * 6 + ["b"] * 6)
    for step in range(8):
        rows = grouped.batch(step)
        assert len({"a" if r < 6 else "b" for r in rows}) == 1
    assert shard([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(DataError, match="not divisible"):
        shard([1, 2, 3], 0, 2)


@pytest.fixture(scope="module")
def tiny_run_objects(tmp_path_factory):
    """A Trainer with the model loaded, for objective-level checks (no training)."""
    root = tmp_path_factory.mktemp("units")
    recipe = load_recipe(tiny_recipe(root / "data", root / "run"))
    trainer = Trainer(recipe, resume=False)
    trainer.load_model()
    return trainer


def test_mntp_predicts_token_i_from_position_i_minus_1(tiny_run_objects):
    run = tiny_run_objects
    stage, _ = run.start_stage(0)
    run.embedder.set_attention(run.recipe.stages[0].attention or run.recipe.model.attention)
    stage.prepare()
    run.embedder.eval()
    loss = backward(stage.loss([0, 1], step=0))  # the trainer's scaling: one process, mean over masked tokens
    # reference: full LM logits shifted by one, cross-entropy on the masked positions only
    xs, ys = zip(*[mask_block(stage.blocks[r], row_rng(run.recipe.seed, 0, 0, r), ratio=0.2, strategy="bert",
                              mask_id=stage.mask_id, vocab=stage.vocab, special=stage.special) for r in (0, 1)],
                 strict=True)
    ids = torch.as_tensor(np.stack(xs))
    labels = torch.as_tensor(np.stack(ys))
    with torch.no_grad():
        logits = run.model.causal_lm(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss - ref.item()) < 1e-4


def test_negative_selection_is_replaceable(tiny_run_objects):
    seen = []

    @register_negative_selector("test_fixed")
    def fixed(settings):
        def select(stage, rows):
            seen.append(list(rows))
            return [[settings["text"]] for _ in rows]
        return select

    run = tiny_run_objects
    cfg = run.recipe.stages[2].model_copy(update={"negative_selection": "test_fixed",
                                                  "negative_settings": {"text": "A cat sat."}})
    run.recipe.stages[2] = cfg
    stage = run.make_objective(2)
    stage.prepare()
    loss = backward(stage.loss([0, 1, 2, 3], step=0))
    assert seen == [[0, 1, 2, 3]] and loss > 0


def test_attention_schedule_is_called_every_step(tmp_path):
    from embedkit.train import run_recipe

    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    recipe["stages"] = recipe["stages"][1:2]
    recipe["stages"][0]["attention_schedule"]["settings"] = {"record": True}
    recipe["checkpoint"]["every"] = 0
    from embedkit.train.recipe import load_recipe as load

    parsed = load(recipe)
    run_recipe(parsed)
    calls = parsed.stages[0].attention_schedule.settings["_calls"]
    assert calls == [(s, 4, "Embedder") for s in range(4)]


def test_qlora_4bit_trains_a_few_steps(tmp_path):
    pytest.importorskip("bitsandbytes")
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from embedkit import Embedder
    from embedkit.train import run_recipe

    # bitsandbytes' CPU 4-bit kernel needs output sizes divisible by 32 (stories260K's 172 is not)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{TINY_MODEL}/{name}", folder / name)
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run")
    recipe["model"]["base"] = str(folder)
    recipe["model"]["dtype"] = "bfloat16"
    recipe["lora"]["quantization"] = "4bit"
    recipe["stages"] = recipe["stages"][2:3]
    recipe["stages"][0]["optimizer"]["name"] = "adamw_8bit"
    recipe["checkpoint"]["every"] = 0
    final = run_recipe(recipe)
    losses = [float(r.split(",")[3]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    import json

    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    vectors = Embedder.load(final).encode(["a cat", "a dog"])
    assert vectors.shape == (2, 64) and np.isfinite(vectors).all()


def test_qlora_without_bitsandbytes_says_how_to_fix(monkeypatch):
    import importlib.util

    from embedkit.train.lora import require_bitsandbytes

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ImportError, match=r"pip install 'embedkit\[qlora\]'"):
        require_bitsandbytes()
