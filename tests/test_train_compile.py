"""The recipe key ``compile``: the decoder layers run through torch.compile while training, with the same losses
and saved weights as eager (up to float32 rounding), and the recipe's fingerprint unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import TINY_MODEL, losses_of, write_data

from embedkit import Embedder
from embedkit.compilation import compile_decoder_layers, compile_pays, is_compiled
from embedkit.packing import probe_packing
from embedkit.train import load_recipe, run_recipe
from embedkit.train.trainer import Trainer


def _recipe(data: Path, output: Path, compile_layers: bool | str) -> dict:
    _, triplets = write_data(data)
    return {"model": {"base": TINY_MODEL, "dtype": "float32", "attention": "causal", "pooling": "mean",
                      "max_length": 24},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(output), "seed": 5, "threads": 1,
            "compile": compile_layers, "checkpoint": {"every": 0},
            "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
            # packed towers (no dropout): lengths change every step, one dynamic-shape graph serves them
            "stages": [{"objective": "supervised", "data": {"paths": [str(triplets)]}, "steps": 3, "batch_size": 4,
                        "optimizer": {"lr": 1e-3}}]}


def test_compiled_training_gives_the_eager_losses_and_weights(tmp_path):
    eager = run_recipe(_recipe(tmp_path / "data", tmp_path / "eager", False))
    compiled = run_recipe(_recipe(tmp_path / "data", tmp_path / "compiled", True))
    losses, expected = losses_of(tmp_path / "compiled"), losses_of(tmp_path / "eager")
    assert len(losses) == 3
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(losses, expected, strict=True)), (losses, expected)
    weights, reference = load_file(compiled / "model.safetensors"), load_file(eager / "model.safetensors")
    assert weights.keys() == reference.keys()  # compiling wraps the layers in place: same names, nothing added
    for name, tensor in reference.items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name


def test_compile_is_applied_to_the_layers_and_left_out_of_the_fingerprint(tmp_path):
    recipe = _recipe(tmp_path / "data", tmp_path / "run", True)
    trainer = Trainer(load_recipe(recipe), resume=False)
    trainer.load_model()
    assert is_compiled(trainer.model.base)
    recipe["compile"] = False
    assert load_recipe(recipe).fingerprint() == trainer.recipe.fingerprint()  # a resume may switch it


@pytest.mark.parametrize(("dtype", "expected"), [("float32", True), ("bfloat16", False)])
def test_compile_auto_compiles_a_float32_model_on_cpu_only(tmp_path, dtype, expected):
    recipe = _recipe(tmp_path / "data", tmp_path / "run", "auto")
    recipe["model"]["dtype"] = dtype
    trainer = Trainer(load_recipe(recipe), resume=False)
    trainer.load_model()
    assert is_compiled(trainer.model.base) is expected
    assert compile_pays(True, trainer.model.base) and not compile_pays(False, trainer.model.base)


def test_compile_takes_only_true_false_or_auto(tmp_path):
    recipe = _recipe(tmp_path / "data", tmp_path / "run", "sometimes")
    with pytest.raises(ValueError, match="compile"):
        load_recipe(recipe)


def test_probes_run_eager_on_compiled_layers(stories_path):
    """The attention and packing probes are checks on odd shapes: with compiled layers they would each compile
    graphs (minutes on a CPU) before the first training step."""
    from torch._dynamo.utils import counters

    embedder = Embedder.from_pretrained(stories_path, dtype="float32", attention="causal")
    compile_decoder_layers(embedder.backbone)
    before = sum(counters["frames"].values())
    embedder.set_attention("bidirectional")  # verified by attention.verify_mode
    assert probe_packing(embedder.backbone)
    assert sum(counters["frames"].values()) == before  # dynamo saw no frame: nothing compiled
