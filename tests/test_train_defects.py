"""Issue-15 defects of training, each pinned: stage names cannot escape output_dir, stale temporaries of a
killed run are removed, a run that never finished a step restarts with the corrected recipe, no silent
coercions, and data errors name the file and line. Plus: every shipped recipe loads, and an objective
defined outside the package trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from test_train_helpers import TINY_MODEL, write_data

from embedkit.train import Objective, RecipeError, StageConfig, load_recipe, register_objective, run_recipe
from embedkit.train.data import DataError
from embedkit.train.losses import Loss
from embedkit.train.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent


def simcse_recipe(tmp_path: Path, base: str = TINY_MODEL, **stage) -> dict:
    texts, _ = write_data(tmp_path / "data")
    return {
        "model": {"base": base, "dtype": "float32", "max_length": 16},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "output_dir": str(tmp_path / "run"), "seed": 1, "threads": 1,
        "checkpoint": {"every": 1}, "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        "stages": [{"objective": "simcse", "data": {"paths": [str(texts)]}, "steps": 2, "batch_size": 4, **stage}],
    }


# -- 2.13: a stage name is a folder name ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../X", "/abs/x", "a/b", ".."])
def test_stage_name_that_leaves_the_run_folder_is_refused(tmp_path, name):
    with pytest.raises(RecipeError, match=rf"stages.0.name = '{name}': Value error, stage name '{name}' is not a "
                                          "safe file name: use letters, digits"):
        load_recipe(simcse_recipe(tmp_path, name=name))


def test_stage_names_must_differ(tmp_path):
    data = simcse_recipe(tmp_path, name="same")
    data["stages"].append(dict(data["stages"][0]))
    with pytest.raises(RecipeError, match=r"stage names must differ .*\['same'\] repeat"):
        load_recipe(data)


# -- 2.9: temporaries of a killed run ----------------------------------------------------------------------------
def _plant_temps(out: Path) -> list[Path]:
    temps = [out / "checkpoints" / ".stage00-step00000001.tmp.k1l2", out / "stages" / "0-simcse" / ".adapter.tmp.x9",
             out / ".final.tmp.abc"]
    for folder in temps:
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"half")
    stray = out / "checkpoints" / ".latest.json.tmp-q8w"
    stray.write_text("{")
    return [*temps, stray]


def test_stale_temporaries_are_removed_on_resume_and_on_a_fresh_start(tmp_path):
    recipe = load_recipe(simcse_recipe(tmp_path))
    folder = RunFolder(recipe)
    kept = folder.checkpoints / "stage00-step00000001"  # a finished checkpoint stays
    kept.mkdir(parents=True)
    (kept / "state.json").write_text(json.dumps({"stage": 0, "step": 1}))
    folder.write_recipe()
    temps = _plant_temps(folder.out)
    assert folder.open(resume=True)["step"] == 1
    assert not any(t.exists() for t in temps)
    assert (kept / "state.json").is_file()
    fresh = RunFolder(recipe.model_copy(update={"output_dir": str(tmp_path / "fresh")}))
    temps = _plant_temps(fresh.out)
    assert fresh.open(resume=False) is None
    assert not any(t.exists() for t in temps)


# -- 2.10: a run that failed at model load --------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_failed_at_model_load_restarts_with_the_corrected_recipe(tmp_path, resume, caplog):
    bad = simcse_recipe(tmp_path, base=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception):  # noqa: B017  (whatever the loader raises; the folder is what matters)
        run_recipe(bad)
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    fixed = simcse_recipe(tmp_path)
    final = run_recipe(fixed, resume=resume)
    assert (final / "embedkit.json").is_file()
    assert "finished no step" in caplog.text
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert TINY_MODEL in saved and "no-such-model" not in saved


# -- 2.12: no silent coercions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("steps", True, "stages.0.steps = True: Input should be a valid integer"),
    ("steps", 2.5, "stages.0.steps = 2.5: Input should be a valid integer"),
    ("batch_size", True, "stages.0.batch_size = True: Input should be a valid integer"),
    ("batch_size", 0, "stages.0.batch_size = 0: Input should be greater than 0"),
])
def test_no_silent_coercion_of_integers(tmp_path, key, value, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_recipe(simcse_recipe(tmp_path, **{key: value}))


def test_null_text_is_an_error_naming_file_and_line(tmp_path):
    rows = tmp_path / "texts.jsonl"
    rows.write_text("\n".join([json.dumps({"text": f"sentence {i}"}) for i in range(8)] + ['{"text": null}']) + "\n")
    data = simcse_recipe(tmp_path)
    data["stages"][0]["data"]["paths"] = [str(rows)]
    with pytest.raises(DataError, match=rf"stages.0 \(simcse\): {rows}:9: field 'text' must be a non-empty string, "
                                        "got None"):
        run_recipe(data)


# -- 2.8: non-UTF-8 data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_data_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    lines = [f"sentence {i}".encode() if suffix == ".txt" else json.dumps({"text": f"s {i}"}).encode()
             for i in range(8)]
    lines[2] = b"caf\xe9 au lait" if suffix == ".txt" else b'{"text": "caf\xe9"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = simcse_recipe(tmp_path)
    data["stages"][0]["data"]["paths"] = [str(path)]
    column = 4 if suffix == ".txt" else 14
    with pytest.raises(DataError, match=rf"stages.0 \(simcse\): {path}:3: not valid UTF-8 \(byte 0xe9 at column "
                                        rf"{column}\); re-save the file as UTF-8"):
        run_recipe(data)


# -- recipes and plug-ins -----------------------------------------------------------------------------------------
def test_every_shipped_recipe_loads():
    """Every training recipe (the tp-*.yaml files configure a training-free embedder, not a run)."""
    paths = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "paper").glob("*.yaml"))
    paths = [p for p in paths if not p.name.startswith("tp-")]
    assert len(paths) >= 17
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.stages and all(recipe.stage_name(i) for i in range(len(recipe.stages))), path


class ToyConfig(StageConfig):
    objective: Literal["test_toy"] = "test_toy"
    target: float = 1.0


@register_objective("test_toy", config=ToyConfig)
class Toy(Objective):
    """An objective from outside the package: pull every text's mean-pooled vector's mean towards ``target``."""

    @classmethod
    def check_data(cls, config, data_dir, recipe_dir) -> int:
        return cls.count_texts(config, data_dir, recipe_dir)

    def prepare(self) -> None:
        self.texts = self.read_all_texts(self.config, self.ctx.data_dir, self.ctx.recipe_dir)

    def num_rows(self) -> int:
        return len(self.texts)

    def loss(self, rows, step) -> Loss:
        emb = self.ctx.embedder
        tokenized = emb.tokenize([self.texts[r] for r in rows])
        vectors = emb(*emb.collate(tokenized))
        value = ((vectors.mean(dim=1) - self.config.target) ** 2).sum()
        return Loss(value, float(len(rows)), sum(len(ids) for ids in tokenized.ids))


def test_an_objective_defined_outside_the_package_trains(tmp_path):
    data = simcse_recipe(tmp_path)
    data["stages"][0] = {"objective": "test_toy", "data": data["stages"][0]["data"], "steps": 3, "batch_size": 4,
                         "target": 0.5, "optimizer": {"lr": 1e-2}}
    final = run_recipe(data)
    losses = [float(r.split(",")[3]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "run" / "stages" / "0-test_toy" / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(losses)).all() and (final / "embedkit.json").is_file()
