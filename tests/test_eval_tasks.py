"""Local task folders: validation (errors name the file and field), discovery, checksums, mteb task shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_helpers import make_all, make_classification, make_clustering, make_retrieval, make_sts, write_task

from embedkit.datasets import read_sts
from embedkit.evaluation.task_sets import read_task_set
from embedkit.evaluation.tasks import (
    TaskFolderError,
    find_tasks,
    folder_checksum,
    read_task,
    read_task_rows,
    suggest,
    to_mteb_task,
)


def test_each_type_reads_with_its_mteb_main_score(tmp_path):
    make_all(tmp_path)
    tasks = find_tasks([tmp_path])
    assert {t.name: (t.type, t.main_score) for t in tasks} == {
        "TinySTS": ("sts", "cosine_spearman"), "TinyBEIR": ("retrieval", "ndcg_at_10"),
        "TinyIntents": ("classification", "accuracy"), "TinyTopics": ("clustering", "v_measure"),
        "TinyPairs": ("pair_classification", "max_ap")}  # the triplets folder is skipped


def test_missing_task_json_names_the_file(tmp_path):
    (tmp_path / "Empty").mkdir()
    with pytest.raises(TaskFolderError, match=r"Empty/task\.json is missing"):
        read_task(tmp_path / "Empty")


def test_bad_json_names_the_file(tmp_path):
    folder = make_sts(tmp_path)
    (folder / "task.json").write_text("{not json")
    with pytest.raises(TaskFolderError, match=r"TinySTS/task\.json is not valid JSON"):
        read_task(folder)


@pytest.mark.parametrize(("change", "message"), [
    ({"name": ""}, r"task\.json: field 'name' is missing"),
    ({"type": None}, r"task\.json: field 'type' is missing"),
    ({"main_score": "spearman_rho"}, r"field 'main_score' is 'spearman_rho'.*use 'cosine_spearman'"),
    ({"min_score": "low"}, r"field 'min_score' is missing or not a number"),
    ({"min_score": 5, "max_score": 0}, r"field 'min_score' \(5\) must be below 'max_score' \(0\)"),
])
def test_bad_fields_name_the_field(tmp_path, change, message):
    folder = make_sts(tmp_path)
    info = json.loads((folder / "task.json").read_text())
    info.update(change)
    (folder / "task.json").write_text(json.dumps(info))
    with pytest.raises(TaskFolderError, match=message):
        read_task(folder)


@pytest.mark.parametrize("name", ["/abs/x", "../../x", "a/b", ".hidden"])
def test_task_names_that_are_not_file_names_are_refused(tmp_path, name):
    """Issue 15, 2.1: results are written as OUTPUT/mteb/<name>.json, so a name must not leave OUTPUT/mteb."""
    folder = make_sts(tmp_path)
    info = json.loads((folder / "task.json").read_text())
    (folder / "task.json").write_text(json.dumps({**info, "name": name}))
    with pytest.raises(TaskFolderError, match=r"TinySTS/task\.json: field 'name': task name .* is not a safe file "
                                              r"name: use letters, digits"):
        read_task(folder)


def test_unknown_type_lists_valid_types_and_a_near_match(tmp_path):
    folder = write_task(tmp_path / "X", {"name": "X", "type": "clusterin"})
    with pytest.raises(TaskFolderError) as err:
        read_task(folder)
    assert "field 'type' is 'clusterin', an unknown task type" in str(err.value)
    assert "sts, retrieval, classification, clustering, pair_classification" in str(err.value)
    assert "Did you mean 'clustering'?" in str(err.value)


def test_training_data_named_explicitly_is_an_error(tmp_path):
    folder = write_task(tmp_path / "T", {"name": "T", "type": "unlabeled"})
    with pytest.raises(TaskFolderError, match="type 'unlabeled' is training data, not an evaluation task"):
        find_tasks([folder])


def test_missing_data_file_names_it(tmp_path):
    folder = make_retrieval(tmp_path)
    (folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(TaskFolderError, match=r"qrels/test\.tsv is missing: retrieval tasks need corpus\.jsonl, "
                                              r"queries\.jsonl, qrels/test\.tsv"):
        read_task(folder)


def test_row_without_a_field_names_file_and_row(tmp_path):
    folder = make_classification(tmp_path)
    with (folder / "test.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "no label here"}) + "\n")
    task = to_mteb_task(read_task(folder))
    with pytest.raises(TaskFolderError, match=r"TinyIntents/test\.jsonl: row 10 lacks field\(s\) \['label'\]"):
        task.load_data()


@pytest.mark.parametrize(("row", "message"), [
    ({"sentence1": "a cat", "sentence2": "a dog", "score": "high"}, r"field 'score' is 'high', not a number"),
    ({"sentence1": "", "sentence2": "a dog", "score": 1.0}, r"field 'sentence1' is empty; every STS row needs two "
                                                            r"non-empty sentences"),
    ({"sentence1": "a cat", "sentence2": None, "score": 1.0}, r"field 'sentence2' is NoneType"),
])
def test_bad_sts_rows_name_file_line_and_field(tmp_path, row, message):
    """Issue 15, 2.8: an STS row with "score": "high" or an empty sentence names the file, line and field."""
    folder = make_sts(tmp_path)
    with (folder / "test.jsonl").open("a") as handle:
        handle.write("\n" + json.dumps(row) + "\n")  # a blank line: the line number is 14, the row number 13
    with pytest.raises(TaskFolderError, match=r"TinySTS/test\.jsonl:14: " + message):
        read_task_rows(read_task(folder))
    with pytest.raises(ValueError, match=r"TinySTS/test\.jsonl:14: " + message):
        read_sts(tmp_path, task="TinySTS")


def test_bad_qrels_header_and_unknown_document(tmp_path):
    folder = make_retrieval(tmp_path)
    qrels = folder / "qrels" / "test.tsv"
    qrels.write_text("qid\tdid\tscore\nq0\td0\t1\n")
    with pytest.raises(TaskFolderError, match="first line must be the header"):
        to_mteb_task(read_task(folder)).load_data()
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\tnope\t1\n")
    with pytest.raises(TaskFolderError, match=r"1 corpus-id\(s\) not in corpus\.jsonl, e\.g\. \['nope'\]"):
        to_mteb_task(read_task(folder)).load_data()


def test_duplicate_task_names_are_refused(tmp_path):
    make_sts(tmp_path / "a")
    make_sts(tmp_path / "b")
    with pytest.raises(TaskFolderError, match="Task name 'TinySTS' appears twice"):
        find_tasks([tmp_path / "a", tmp_path / "b"])


def test_folder_without_tasks(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(TaskFolderError, match="holds no evaluation task folder"):
        find_tasks([tmp_path / "nothing"])
    with pytest.raises(TaskFolderError, match="does not exist"):
        find_tasks([tmp_path / "absent"])


def test_checksum_follows_the_data(tmp_path):
    folder = make_sts(tmp_path)
    first = folder_checksum(folder)
    assert folder_checksum(folder) == first and len(first) == 64
    with (folder / "test.jsonl").open("a") as handle:
        handle.write(json.dumps({"sentence1": "x", "sentence2": "y", "score": 1.0}) + "\n")
    assert folder_checksum(folder) != first


def test_task_set_paths_are_relative_to_the_data_folder(tmp_path):
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "mine.txt").write_text("# comment\nsts/TinySTS  # trailing comment\n\n/abs/Task\n")
    assert read_task_set("mine", tmp_path / "data", sets) == [tmp_path / "data" / "sts" / "TinySTS", Path("/abs/Task")]
    with pytest.raises(FileNotFoundError, match="known sets: mine"):
        read_task_set("other", tmp_path, sets)


def test_mteb_task_shapes(tmp_path):
    """What load_data hands mteb: string labels become shared int ids; retrieval is RetrievalSplitData."""
    cls_task = to_mteb_task(read_task(make_classification(tmp_path)))
    cls_task.load_data()
    assert cls_task.metadata.type == "Classification" and cls_task.metadata.main_score == "accuracy"
    assert sorted(set(cls_task.dataset["train"]["label"])) == [0, 1, 2]
    assert cls_task.dataset["test"]["label"][:3] == [0, 1, 2]  # alpha, beta, gamma

    clu = to_mteb_task(read_task(make_clustering(tmp_path)))
    clu.load_data()
    assert len(clu.dataset["test"]) == 30 and clu.max_fraction_of_documents_to_embed is None

    ret_task = read_task(make_retrieval(tmp_path))
    ret = to_mteb_task(ret_task)
    ret.load_data()
    split = ret.dataset["default"]["test"]
    assert split["relevant_docs"]["q3"] == {"d3": 1}
    assert split["corpus"][1] == {"id": "d1", "title": "Title 1", "text": "document body 1"}
    assert ret.metadata.dataset["revision"] == ret_task.checksum()


def test_suggest_finds_near_names():
    names = ["STSBenchmark", "STS12", "Banking77Classification", "SciFact"]
    assert suggest("STSBenchmrk", names)[0] == "STSBenchmark"
    assert "Banking77Classification" in suggest("banking77", names)
