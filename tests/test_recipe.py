"""Recipe schema, overrides and data checks: every bad input fails before a model loads, saying where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedkit.train import RecipeError, load_recipe, run_recipe
from embedkit.train.data import DataError
from embedkit.train.recipe import apply_overrides

REPO = Path(__file__).resolve().parent.parent


def base_recipe(tmp_path: Path, **stage) -> dict:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence number {i} is here" for i in range(40)) + "\n")
    return {
        "model": {"base": "no/such-model-anywhere", "max_length": 16},
        "output_dir": str(tmp_path / "out"),
        "stages": [{"objective": "simcse", "data": {"paths": [str(texts)]}, "steps": 2, "batch_size": 4, **stage}],
    }


def test_defaults_follow_the_papers(tmp_path):
    data = base_recipe(tmp_path)
    data["stages"] += [
        {"objective": "mntp", "data": {"paths": ["x.txt"]}, "steps": 1},
        {"objective": "supervised", "data": {"paths": ["x.jsonl"]}, "steps": 1},
    ]
    recipe = load_recipe(data)
    simcse, mntp, sup = recipe.stages
    assert simcse.temperature == 0.05 and sup.temperature == 0.02
    assert mntp.mask_ratio == 0.2 and mntp.mask_strategy == "bert" and mntp.train_lm_head is False
    assert recipe.stage_name(1) == "1-mntp"
    # subclass fields survive a dump (SerializeAsAny), so saved recipes keep them
    assert recipe.model_dump()["stages"][2]["hard_negatives"] == 1


def test_unknown_key_names_path_value_and_allowed(tmp_path):
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(base_recipe(tmp_path, temprature=0.1)))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert str(path) in text
    assert "stages.0.temprature = 0.1: unknown key; allowed keys:" in text
    assert "temperature" in text.split("allowed keys:")[1]


def test_wrong_type_and_bad_choice_are_all_reported(tmp_path):
    data = base_recipe(tmp_path, steps="ten")
    data["model"]["attention"] = "sideways"
    with pytest.raises(RecipeError) as err:
        load_recipe(data)
    text = str(err.value)
    assert "2 problems" in text
    assert "stages.0.steps = 'ten': Input should be a valid integer" in text
    assert "model.attention = 'sideways': Input should be 'causal' or 'bidirectional'" in text


def test_unknown_objective_lists_the_registered_ones(tmp_path):
    data = base_recipe(tmp_path)
    data["stages"][0]["objective"] = "magic"
    with pytest.raises(RecipeError, match=r"stages.0.objective = 'magic': unknown objective; allowed: .*mntp"):
        load_recipe(data)


def test_steps_xor_epochs_and_nested_unknown_key(tmp_path):
    data = base_recipe(tmp_path, epochs=1)
    data["lora"] = {"rank": 8}
    with pytest.raises(RecipeError) as err:
        load_recipe(data)
    assert "give steps or epochs, not both" in str(err.value)
    assert "lora.rank = 8: unknown key; allowed keys: r, alpha" in str(err.value)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    data = base_recipe(tmp_path)
    recipe = load_recipe(data, ["stages.0.steps=7", "stages.0.optimizer.lr=1e-4", "lora.target_modules=[q_proj]",
                                "model.template='none: {text}'"])
    assert recipe.stages[0].steps == 7
    assert recipe.stages[0].optimizer.lr == 1e-4
    assert recipe.lora.target_modules == ["q_proj"]
    assert recipe.model.template == "none: {text}"
    with pytest.raises(RecipeError, match="stages.0.steps = -1"):
        load_recipe(data, ["stages.0.steps=-1"])
    with pytest.raises(RecipeError, match="stages.3 is not an index of a list of 1"):
        load_recipe(data, ["stages.3.steps=1"])
    with pytest.raises(RecipeError, match="not of the form key.sub=value"):
        load_recipe(data, ["stages.0.steps"])
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_fingerprint_ignores_logging_only(tmp_path):
    data = base_recipe(tmp_path)
    a = load_recipe(data)
    assert load_recipe(data, ["logging.every=3", "checkpoint.every=5"]).fingerprint() == a.fingerprint()
    assert load_recipe(data, ["stages.0.optimizer.lr=1e-3"]).fingerprint() != a.fingerprint()


# -- data problems: the model spec is bogus, so reaching the model would raise a different error ------------

def test_missing_data_file(tmp_path):
    data = base_recipe(tmp_path)
    data["stages"][0]["data"]["paths"] = ["nowhere/sentences.txt"]
    with pytest.raises(DataError, match=r"stages.0 \(simcse\): Data file 'nowhere/sentences.txt' not found; tried"):
        run_recipe(data)


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    data = base_recipe(tmp_path)
    data["stages"][0]["data"]["paths"] = [str(empty)]
    with pytest.raises(DataError, match=f"{empty} has no texts"):
        run_recipe(data)


def test_triplet_missing_field_gives_file_and_line(tmp_path):
    triplets = tmp_path / "t.jsonl"
    rows = [{"anchor": "a b", "positive": "c d", "negative": "e f"}] * 3 + [{"anchor": "a", "positive": "b"}]
    triplets.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = base_recipe(tmp_path)
    data["stages"][0] = {"objective": "supervised", "data": {"paths": [str(triplets)]}, "steps": 1, "batch_size": 2}
    with pytest.raises(DataError, match=rf"{triplets}:4: missing field 'negative'"):
        run_recipe(data)
    triplets.write_text("{not json\n")
    with pytest.raises(DataError, match=rf"{triplets}:1: not valid JSON"):
        run_recipe(data)


def test_batch_larger_than_data(tmp_path):
    data = base_recipe(tmp_path, batch_size=64)
    with pytest.raises(DataError, match=r"batch_size=64 is larger than the data \(40 rows"):
        run_recipe(data)


def test_shipped_recipes_validate():
    ours = [p for p in sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "paper").glob("*.yaml"))
            if not p.name.startswith("tp-")]  # tp-*: Token Prepending settings (training-free), not recipes
    names = {p.name for p in ours}
    assert {"llm2vec-smollm2-cpu.yaml", "llm2vec-smollm2-supervised-cpu.yaml", "mix-gemma3-270m-cpu.yaml",
            "supervised-gemma3-270m-cpu.yaml"} <= names
    assert len(names) >= 18
    for path in ours:
        recipe = load_recipe(path)
        assert recipe.stages


def test_cli_train_reports_a_bad_recipe_in_one_line(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from embedkit.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tmp_path)))
    result = CliRunner().invoke(app, ["train", str(path), "stages.0.temprature=0.1", "--resume"])
    assert result.exit_code == 2
    assert "stages.0.temprature = 0.1: unknown key" in result.output
    assert "Traceback" not in result.output
