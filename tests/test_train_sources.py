"""Data mixtures: every source format read through its column mapping, one-line errors for bad sources, the
weighted batch plans (same-source and mixed; pure functions of the step, so resume and any number of processes
see the same batches), and a mixture stage of pairs and triplets training end to end on stories260K."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train_helpers import tiny_recipe

from embedkit.train import run_recipe
from embedkit.train.config import SourceSpec
from embedkit.train.data import BatchPlan, DataError, RowGroups, epoch_order, mixture_epoch_order, shard
from embedkit.train.recipe import RecipeError, load_recipe
from embedkit.train.sources import read_source_pairs, read_source_texts, read_stage_pairs

PAIRS = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(spec: dict, k: int = 1, root: Path | None = None):
    return read_source_pairs(SourceSpec(**spec), k, root, None)


# -- formats and mappings ----------------------------------------------------------------------------------------
def test_every_local_format_reads_through_its_mapping(tmp_path):
    import datasets

    (tmp_path / "p.csv").write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in PAIRS))
    (tmp_path / "p.tsv").write_text("question\tanswer\n" + "".join(f"{q}\t{a}\n" for q, a in PAIRS))
    pq.write_table(pa.table({"question": [q for q, _ in PAIRS], "answer": [a for _, a in PAIRS]}),
                   tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"question": [q for q, _ in PAIRS], "answer": [a for _, a in PAIRS],
                                "extra": [1, 2, 3]}).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "p.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    mapping = {"anchor": "question", "positive": "answer"}
    for name in ("p.csv", "p.tsv", "p.parquet", "saved", "p.jsonl"):
        rows = pairs({"path": name, "columns": mapping, "instruction": "Q: "}, root=tmp_path)
        assert list(zip(rows.anchors, rows.positives, strict=True)) == PAIRS, name
        assert rows.negatives == [[], [], []] and rows.sources == [name] * 3 and rows.instructions == ["Q: "] * 3
    assert len(pairs({"path": "p.parquet", "columns": mapping, "limit": 2}, root=tmp_path)) == 2
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert read_source_texts(SourceSpec(path="t.txt"), tmp_path, None) == ["one", "two"]
    assert read_source_texts(SourceSpec(path="p.csv", columns={"text": "answer"}), tmp_path, None) == ["a1", "a2",
                                                                                                        "a3"]


def test_pairs_and_triplets_mix_and_negatives_follow_hard_negatives(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"anchor": "a", "positive": "p", "negative": "n"}])
    write_jsonl(tmp_path / "p.jsonl", [{"anchor": "b", "positive": "q"}])
    data = load_recipe(_mix_recipe(tmp_path, [{"path": "t.jsonl"}, {"path": "p.jsonl"}])).stages[0].data
    rows = read_stage_pairs(data, 1, tmp_path, None)
    assert rows.negatives == [["n"], []] and rows.sources == ["t.jsonl", "p.jsonl"]
    assert read_stage_pairs(data, 0, tmp_path, None).negatives == [[], []]


def test_inverse_cloze_pairs_each_run_of_texts_by_rotating_anchor(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\nc\nd\ne\nf\ng\n")
    rows = pairs({"path": "s.txt", "inverse_cloze": 2, "instruction": "Q: "}, root=tmp_path)
    # runs [a b c], [d e f]; the anchor moves one place a run; g, a short last run, is dropped
    assert list(zip(rows.anchors, rows.positives, strict=True)) == [("a", "b c"), ("e", "d f")]
    assert rows.negatives == [[], []] and rows.sources == ["s.txt"] * 2 and rows.instructions == ["Q: "] * 2
    write_jsonl(tmp_path / "t.jsonl", [{"body": str(i)} for i in range(10)])
    rows = pairs({"path": "t.jsonl", "columns": {"text": "body"}, "inverse_cloze": 1, "limit": 6}, root=tmp_path)
    assert list(zip(rows.anchors, rows.positives, strict=True)) == [("0", "1"), ("3", "2"), ("4", "5")]


def test_inverse_cloze_needs_a_text_column_and_a_whole_run(tmp_path):
    with pytest.raises(RecipeError, match="inverse_cloze makes pairs from a text column: map text: COLUMN"):
        load_recipe(_mix_recipe(tmp_path, [{"path": "a.jsonl", "inverse_cloze": 2,
                                            "columns": {"anchor": "q", "positive": "p"}}]))
    (tmp_path / "s.txt").write_text("a\nb\n")
    with pytest.raises(DataError) as err:
        pairs({"path": "s.txt", "inverse_cloze": 2}, root=tmp_path)
    assert str(err.value) == ("source 's.txt' has 2 texts, fewer than the inverse_cloze run of 3; give it more texts "
                              "or a smaller inverse_cloze.")
    with pytest.raises(DataError, match="sets inverse_cloze, which pairs texts for the pair objectives"):
        read_source_texts(SourceSpec(path="s.txt", inverse_cloze=1), tmp_path, None)


# -- bad input: one line each --------------------------------------------------------------------------------------
def test_columns_that_do_not_match_name_file_columns_and_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        pairs({"path": str(path)})
    assert str(err.value) == (f"{path}: columns ['answer', 'question'] do not match the mapping {{anchor='anchor', "
                              "positive='positive'}; set the source's columns: (anchor/positive/negative, or text).")
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: columns \['a'\] do not match the mapping \{text='text'\}"):
        read_source_texts(SourceSpec(path=str(tmp_path / "x.parquet")), None, None)


def test_an_empty_source_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError) as err:
        pairs({"path": "empty.jsonl"}, root=tmp_path)
    assert str(err.value) == "source 'empty.jsonl' has no rows (empty); give it rows or leave it out."


@pytest.mark.parametrize("weight", [0, -1.5])
def test_a_weight_that_is_not_positive_is_refused(tmp_path, weight):
    with pytest.raises(RecipeError) as err:
        load_recipe(_mix_recipe(tmp_path, [{"path": "a.jsonl", "weight": weight}, {"path": "b.jsonl", "weight": 1}]))
    assert str(err.value).splitlines()[1] == (
        f"  stages.0.data.0.weight = {weight}: Value error, weight must be > 0 (a share of the batches), got "
        f"{float(weight)}; leave the source out to give it none")


def test_mixed_weights_and_repeated_names_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="give every source a weight, or none"):
        load_recipe(_mix_recipe(tmp_path, [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]))
    with pytest.raises(RecipeError, match=r"sources must have distinct names \(set name:\), \['a.jsonl'\] repeat"):
        load_recipe(_mix_recipe(tmp_path, [{"path": "a.jsonl"}, {"path": "a.jsonl"}]))


def test_a_hub_id_without_network_says_how_to_provide_a_local_copy(monkeypatch):
    import datasets
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        pairs({"dataset": "embedkit-test/no-such-set", "subset": "pair", "split": "train"})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("Hugging Face dataset 'embedkit-test/no-such-set/pair:train' could not be loaded (")
    assert message.endswith("it needs the hub, or a local copy: where there is network run "
                            "datasets.load_dataset(...).save_to_disk(FOLDER) and give the source path: FOLDER.")


def test_bad_utf8_and_null_text_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"anchor,positive\nok,fine\ncaf\xe9,x\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        pairs({"path": str(path)})
    pq.write_table(pa.table({"anchor": ["a", None], "positive": ["p", "q"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null.parquet:row 2: field 'anchor' must be a non-empty string, got None"):
        pairs({"path": str(tmp_path / "null.parquet")})


# -- batch plans ----------------------------------------------------------------------------------------------------
NAMES = ["a"] * 12 + ["b"] * 30 + ["c"] * 9


def _old_grouped_order(groups, batch_size, seed, epoch):
    """The same-source order before mixtures (kept here to pin it)."""
    rng = np.random.default_rng([seed, epoch, 1])
    by_group: dict[str, list[int]] = {}
    for i, name in enumerate(groups):
        by_group.setdefault(name, []).append(i)
    batches = []
    for name in sorted(by_group):
        rows = rng.permutation(by_group[name])
        batches += [rows[s:s + batch_size].tolist() for s in range(0, len(rows) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def test_by_size_the_mixture_plan_is_the_old_plan():
    for epoch in range(3):
        assert mixture_epoch_order(RowGroups(NAMES), 3, 5, epoch) == _old_grouped_order(NAMES, 3, 5, epoch)
        mixed = mixture_epoch_order(RowGroups(NAMES, same_source=False), 3, 5, epoch)
        order = epoch_order(len(NAMES), 5, epoch)
        assert mixed == [order[i * 3:(i + 1) * 3].tolist() for i in range(len(NAMES) // 3)]


def test_weighted_same_source_batches_follow_the_weights():
    groups = RowGroups(NAMES, {"a": 1.0, "b": 1.0, "c": 2.0})
    batches = mixture_epoch_order(groups, 3, 5, 0)
    assert len(batches) == 4 + 10 + 3  # as many batches as one pass
    source = [{NAMES[r] for r in batch} for batch in batches]
    assert all(len(s) == 1 for s in source)
    counts = {name: sum(s == {name} for s in source) for name in "abc"}
    assert counts == {"a": 4, "b": 4, "c": 9}  # 17 batches split 1:1:2 (largest remainder)
    c_rows = [r for batch in batches if NAMES[batch[0]] == "c" for r in batch]
    assert sorted(c_rows) == sorted(list(range(42, 51)) * 3)  # oversampled: three whole passes over c


def test_weighted_mixed_batches_draw_rows_by_weight():
    groups = RowGroups(NAMES, {"a": 1.0, "b": 0.0001, "c": 1.0}, same_source=False)
    rows = [r for batch in mixture_epoch_order(groups, 3, 5, 0) for r in batch]
    share = {name: sum(NAMES[r] == name for r in rows) for name in "abc"}
    assert share == {"a": 26, "b": 0, "c": 25}  # 51 rows split 1:1 (ties by name), b rounds to none


def test_plan_is_a_pure_function_of_the_step_on_any_number_of_processes():
    groups = RowGroups(NAMES, {"a": 3.0, "b": 1.0, "c": 1.0})
    plan = BatchPlan(len(NAMES), 4, 11, groups)
    steps = range(3 * plan.per_epoch)
    first = [plan.batch(s) for s in steps]
    again = BatchPlan(len(NAMES), 4, 11, groups)
    assert [again.batch(s) for s in reversed(steps)] == first[::-1]  # a resumed run starts anywhere
    for world in (1, 2, 4):
        assert all(sum((shard(b, r, world) for r in range(world)), []) == b for b in first)
    assert first[: plan.per_epoch] != first[plan.per_epoch: 2 * plan.per_epoch]  # epochs differ


def test_a_source_smaller_than_a_batch_is_refused_for_same_source_batches(tmp_path):
    write_jsonl(tmp_path / "big.jsonl", [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(8)])
    write_jsonl(tmp_path / "small.jsonl", [{"anchor": "x", "positive": "y"}])
    recipe = _mix_recipe(tmp_path, [{"path": str(tmp_path / "big.jsonl")}, {"path": str(tmp_path / "small.jsonl")}])
    with pytest.raises(DataError, match=r"small.jsonl' has 1 rows, fewer than batch_size=4: same-source batches"):
        run_recipe(recipe)


# -- a mixture stage end to end ------------------------------------------------------------------------------------
def _mix_recipe(tmp_path: Path, data: list[dict], **stage) -> dict:
    recipe = tiny_recipe(tmp_path / "data", tmp_path / "run", checkpoint={"every": 0, "keep": 1})
    recipe["stages"] = [{"objective": "supervised", "data": data, "steps": 4, "batch_size": 4, "hard_negatives": 1,
                         "optimizer": {"lr": 1e-3}, **stage}]
    recipe["lora"]["dropout"] = 0.0
    return recipe


def test_pairs_and_triplets_train_in_one_stage(tmp_path):
    _, triplets = tiny_recipe.__globals__["write_data"](tmp_path / "data")
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(8)])
    sources = [{"path": str(triplets), "weight": 2}, {"path": str(pairs_file), "name": "qa", "weight": 1,
                                                      "columns": {"anchor": "q", "positive": "a"}}]
    for batches in ("same_source", "mixed"):
        recipe = _mix_recipe(tmp_path / batches, sources, batches=batches)
        run_recipe(recipe)
        rows = (tmp_path / batches / "run" / "metrics.csv").read_text().splitlines()[1:]
        losses = [float(r.split(",")[3]) for r in rows if r.split(",")[3]]
        assert len(losses) == 4 and all(np.isfinite(losses))


def test_runs_saved_before_mixtures_keep_their_fingerprint(tmp_path):
    """A run started before the new stage keys (batches, false_negatives) must still resume: their defaults are
    left out of the fingerprint. The value is the one the code before this change gave this recipe."""
    recipe = json.loads(json.dumps(tiny_recipe(tmp_path / "data", tmp_path / "run")).replace(str(tmp_path), "/ROOT"))
    recipe["model"]["base"] = "stories260K"
    assert load_recipe(recipe).fingerprint() == "ec9c776f037cc27e"
    recipe["stages"][2]["false_negatives"] = {"duplicates": False}
    assert load_recipe(recipe).fingerprint() != "ec9c776f037cc27e"


def test_mixture_runs_saved_before_inverse_cloze_keep_their_fingerprint():
    """The value the code before ``inverse_cloze`` gave the shipped distillation recipe (a list of sources)."""
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "distill-gemma3-270m-cpu.yaml")
    assert recipe.fingerprint() == "d1b4a33b52ff6324"
    recipe.stages[0].data.sources[0].inverse_cloze = 2
    assert recipe.fingerprint() != "d1b4a33b52ff6324"
