"""The methods inside real (tiny) training runs on stories260K: the soft-mask schedule drives the attention bias
step by step, dynamic mining swaps negatives from the loss's scores, the latent-attention pooler trains end to
end and is saved (embedkit and sentence-transformers load it, resume restores it), and the GEM stage trains
and saves an embedder that embeds with its special tokens."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from test_train_helpers import TINY_MODEL, write_data

import embedkit.methods.soft_mask as soft_mask
from embedkit import Embedder
from embedkit.methods import gem
from embedkit.pooling import LatentAttentionConfig, LatentAttentionPooling
from embedkit.train import RecipeError, load_recipe, run_recipe
from embedkit.train.negatives import DynamicSelector
from embedkit.train.trainer import _seed_for

TEXTS = ["Once upon a time there was a cat.", "The dog ran home.", "Two kids play outside ."]
LATENT = {"num_latents": 8, "num_heads": 2, "mlp_ratio": 1}


def base_recipe(tmp_path, stage: dict, **model) -> dict:
    return {
        "model": {"base": TINY_MODEL, "dtype": "float32", "attention": "bidirectional", "pooling": "mean",
                  "max_length": 24, **model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "output_dir": str(tmp_path / "run"), "seed": 7, "threads": 1,
        "checkpoint": {"every": 0}, "logging": {"every": 1, "progress_bar": False, "tensorboard": False,
                                                "plot": False},
        "stages": [stage],
    }


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    """Soft mask + dynamic negatives + latent-attention pooling in one supervised stage (2 epochs of 8 rows)."""
    root = tmp_path_factory.mktemp("methods")
    _, triplets = write_data(root / "data")
    stage = {"objective": "supervised", "data": {"paths": [str(triplets)], "limit": 8}, "steps": 4,
             "batch_size": 4, "optimizer": {"lr": 1e-2},
             "attention_schedule": {"name": "soft_mask", "settings": {"weight": "l_over_i", "tau": 2}},
             "negative_selection": "dynamic",  # floor 2: every negative is "too easy"; no false-negative filter
             "negative_settings": {"floor": 2.0, "false_negative_margin": 10.0}}
    recipe = base_recipe(root, stage, pooling="latent_attention", latent_attention=LATENT)
    alphas, selections = [], []
    real_bias, real_call = soft_mask.soft_mask_bias, DynamicSelector.__call__

    def spy_bias(alpha, weight="linear"):
        inner = real_bias(alpha, weight)
        alphas.append([alpha, weight, 0])

        def bias(ids, mask, base):
            alphas[-1][2] += 1  # used by forward passes of this step
            return inner(ids, mask, base)
        return bias

    def spy_call(self, stage, rows):
        chosen = real_call(self, stage, rows)
        selections.append((list(rows), chosen, [stage.rows.negatives[r] for r in rows]))
        return chosen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(soft_mask, "soft_mask_bias", spy_bias)
        patch.setattr(DynamicSelector, "__call__", spy_call)
        final = run_recipe(recipe)
    return recipe, final, alphas, selections


def test_soft_mask_schedule_sets_the_bias_each_step(supervised_run):
    _, final, alphas, _ = supervised_run
    assert [(a, w) for a, w, _ in alphas] == [(0.0, "l_over_i"), (0.5, "l_over_i"), (1.0, "l_over_i"),
                                             (1.0, "l_over_i")]
    assert all(uses > 0 for _, _, uses in alphas)
    loaded = Embedder.load(final)
    assert loaded.attention_bias is None and loaded.config.attention == "bidirectional"


def test_dynamic_mining_replaces_negatives_across_epochs(supervised_run):
    _, _, _, selections = supervised_run
    assert len(selections) == 4
    first_epoch = {r: n for rows, chosen, _ in selections[:2] for r, n in zip(rows, chosen, strict=True)}
    data = {r: d for rows, _, datas in selections[:2] for r, d in zip(rows, datas, strict=True)}
    assert first_epoch == data  # the data's negatives first
    second = {r: n for rows, chosen, _ in selections[2:] for r, n in zip(rows, chosen, strict=True)}
    assert sorted(second) == sorted(first_epoch)
    swapped = [r for r in second if second[r] != data[r]]
    assert len(swapped) == len(second)  # floor 2.0: every first score is "too easy", pools were fed in-batch
    for r in swapped:
        assert second[r][0] != data[r][0]
    # the miner's counts are logged at the end of the stage (16 observations: 4 steps x 4 anchors)
    recipe = supervised_run[0]
    events = {row["event"]: row["value"] for row in csv.DictReader(open(Path(recipe["output_dir"]) / "metrics.csv"))
              if row["event"]}
    assert int(events["0-supervised stage: observed"]) == 16
    assert int(events["0-supervised stage: replacements"]) >= len(swapped)


def test_latent_attention_trained_saved_and_loaded(supervised_run):
    recipe, final, _, _ = supervised_run
    torch.manual_seed(_seed_for(recipe["seed"], -1, -1, 0))
    initial = LatentAttentionPooling(LatentAttentionConfig(hidden_size=64, **LATENT)).state_dict()
    trained = load_file(str(final / "1_LatentAttentionPooling" / "model.safetensors"))
    assert trained.keys() == initial.keys()
    assert any(not torch.allclose(trained[k], initial[k]) for k in trained), "the pooler did not train"
    ours = Embedder.load(final).encode(TEXTS)
    st = SentenceTransformer(str(final), device="cpu", trust_remote_code=True).encode(TEXTS)
    np.testing.assert_allclose(ours, st, atol=1e-4)


def test_resume_replays_the_stage_with_its_pooler(supervised_run, tmp_path):
    recipe, final, _, _ = supervised_run
    copy = tmp_path / "run"
    shutil.copytree(recipe["output_dir"], copy)
    shutil.rmtree(copy / "final")  # as if killed after the stage's end checkpoint
    resumed = run_recipe({**recipe, "output_dir": str(copy)}, resume=True)
    np.testing.assert_allclose(Embedder.load(resumed).encode(TEXTS), Embedder.load(final).encode(TEXTS), atol=1e-6)


def test_gem_stage_trains_and_saves_a_gem_embedder(tmp_path):
    texts, _ = write_data(tmp_path / "data")
    stage = {"objective": "gem", "data": {"paths": [str(texts)]}, "steps": 4, "batch_size": 4,
             "num_special_tokens": 2, "switch_step": 2, "contrastive_weight": 0.5, "reconstruction_prob": 0.5,
             "optimizer": {"lr": 1e-2}}
    final = run_recipe(base_recipe(tmp_path, stage, attention="causal", pooling="last"))
    config = json.loads((final / "embedkit.json").read_text())
    assert config["methods"]["gem"] == {"num_special_tokens": 2, "isolate_special_tokens": True}
    assert config["pooling"] == "last" and config["attention"] == "causal"
    loaded = Embedder.load(final)
    assert loaded.tokenizer.convert_tokens_to_ids(gem.special_tokens(2)) == [512, 513]
    assert loaded.encode(TEXTS).shape == (3, 64)
    scale = load_file(str(tmp_path / "run" / "stages" / "0-gem" / "adapter" / "extra.safetensors"))["extra.0"]
    assert float(scale) != 20.0  # the learnable scale moved once the contrastive term was on
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 4


def test_method_settings_are_validated(tmp_path):
    texts, triplets = write_data(tmp_path / "data")
    bad = {"objective": "gem", "data": {"paths": [str(texts)]}, "steps": 1, "reconstruction_prob": 1.5}
    with pytest.raises(RecipeError, match="reconstruction_prob"):
        load_recipe(base_recipe(tmp_path, bad))
    unknown = {"objective": "supervised", "data": {"paths": [str(triplets)]}, "steps": 1,
               "attention_schedule": {"name": "soft_masks"}}
    with pytest.raises(RecipeError, match="soft_mask"):
        load_recipe(base_recipe(tmp_path, unknown))


def test_shipped_recipes_validate():

    root = Path(__file__).resolve().parent.parent / "recipes"
    found = {p.name: load_recipe(p) for pattern in ("gem-*.yaml", "conan-*.yaml", "nvembed-*.yaml")
             for p in sorted(root.glob(pattern))}
    assert {"gem-smollm2-135m.yaml", "conan-smollm2-135m-soft-mining.yaml", "nvembed-smollm2-135m.yaml"} <= set(found)
    for name, recipe in found.items():
        stage = recipe.stages[0]
        if name.startswith("gem-"):
            assert stage.objective == "gem" and stage.switch_step in (50, 100) and stage.scale_init == 20
        if name.startswith("nvembed-"):
            assert recipe.model.pooling == "latent_attention"
        if "soft" in name or name == "conan-qwen2.5-1.5b.yaml":
            assert stage.attention_schedule.name == "soft_mask"
        if "mining" in name or name == "conan-qwen2.5-1.5b.yaml":
            assert stage.negative_selection == "dynamic"
