"""Golden outputs of the code before the big refactoring (pooling, index, train objectives, CLI into packages):
vectors for every attention x pooling on stories260K and a tiny random Llama plus the embed-time methods, the
first step losses of every shipped CPU recipe, flat / HNSW search results, and a folder saved by the old code.
Behaviour must not change, so these must keep passing. The numbers live in tests/golden/ and come from
tests/golden/make_golden.py, which is run only on purpose (when a change of behaviour is intended); the cases
themselves are in tests/golden_cases.py."""

from __future__ import annotations

import json

import golden_cases as g
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from embedkit import Embedder
from embedkit.embedder import open_model
from embedkit.train import load_recipe

CASES = json.loads((g.GOLDEN / "cases.json").read_text())
LOSSES = json.loads((g.GOLDEN / "losses.json").read_text())


def golden_vectors(group: str) -> np.ndarray:
    return np.load(g.GOLDEN / f"vectors-{group}.npy", allow_pickle=False)


@pytest.mark.parametrize("group", sorted(g.vector_groups()))
def test_vectors(group):
    want = golden_vectors(group)
    cases = list(g.vector_groups()[group]())
    assert [name for name, _ in cases] == CASES[group]
    for (name, compute), expected in zip(cases, want, strict=True):
        np.testing.assert_allclose(compute(), expected, atol=1e-6, rtol=1e-5, err_msg=f"{group}: {name}")


def test_the_cases_differ():
    """The golden vectors are not all one vector: each setting really changes the output."""
    for group in CASES:
        flat = golden_vectors(group).reshape(len(CASES[group]), -1)
        gaps = np.abs(flat[:, None] - flat[None]).max(-1) + np.eye(len(flat))
        assert gaps.min() > 1e-4, group


@pytest.mark.parametrize("recipe", g.TRAIN_RECIPES)
def test_first_step_losses(recipe):
    """The losses are those of metrics.csv, rounded there to 6 decimals: hence abs=1.5e-6 beside rel=1e-4."""
    got = g.train_losses(recipe)
    want = LOSSES[recipe]
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-4, abs=1.5e-6)


def test_every_shipped_cpu_recipe_is_covered():
    shipped = {p.stem for p in (g.REPO / "recipes").glob("*.yaml")}
    big = {"conan-qwen2.5-1.5b", "gem-llama3.1-8b", "nvembed-mistral-7b", "tp-llama2-7b"}
    assert shipped - big == {*g.TRAIN_RECIPES, *g.STEP_VARIANTS, g.TP_RECIPE}


@pytest.mark.parametrize(("variant", "parent"), g.STEP_VARIANTS.items())
def test_a_step_variant_is_its_parent_recipe_at_fewer_steps(variant, parent):
    def settings(name: str) -> dict:
        recipe = load_recipe(g.REPO / "recipes" / f"{name}.yaml").model_dump(exclude={"name", "output_dir"})
        recipe["steps"] = [stage.pop("steps") for stage in recipe["stages"]]
        return recipe

    mine, theirs = settings(variant), settings(parent)
    assert all(a < b for a, b in zip(mine.pop("steps"), theirs.pop("steps"), strict=True))
    assert mine == theirs


def test_index_search(tmp_path):
    got = g.index_results(tmp_path)
    want = json.loads((g.GOLDEN / "index.json").read_text())
    assert got.keys() == want.keys()
    for kind in want:
        assert got[kind]["ids"] == want[kind]["ids"], kind
        np.testing.assert_allclose(got[kind]["scores"], want[kind]["scores"], atol=1e-5, rtol=0, err_msg=kind)


def test_old_saved_folder_loads_and_gives_the_golden_vectors():
    want = np.load(g.GOLDEN / "saved-embedder-v0.npy", allow_pickle=False)
    size = sum(p.stat().st_size for p in g.FIXTURE.rglob("*") if p.is_file())
    assert size < 3 << 20
    loaded = Embedder.load(g.FIXTURE)
    assert (loaded.config.attention, loaded.config.pooling, loaded.config.query_instruction) == (
        "bidirectional", "mean", "q: ")
    np.testing.assert_allclose(g.fixture_vectors(loaded), want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(g.fixture_vectors(open_model(g.FIXTURE)), want, atol=1e-6, rtol=1e-5)
    st = SentenceTransformer(str(g.FIXTURE), device="cpu")
    np.testing.assert_allclose(st.encode(g.TEXTS), want[: len(g.TEXTS)], atol=1e-4)
    np.testing.assert_allclose(st.encode(g.TEXTS, prompt_name="query"), want[len(g.TEXTS):], atol=1e-4)
