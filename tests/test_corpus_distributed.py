"""Scale-out: shards split across processes (rank r takes shards r, r+W, ...); the last one merges the manifest;
the result equals a single-process run, whatever the process count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedkit import Embedder
from embedkit.corpus import encode_corpus, open_vectors

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"
SENTENCES = REPO.parent / "shared" / "data" / "unlabeled" / "TinyStories" / "sentences.txt"


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(STORIES, dtype="float32", max_length=48)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES.read_text(encoding="utf-8").splitlines()[:30]) + "\n", encoding="utf-8")
    return path


def _shards(folder):
    return [(s["shard"], s["count"], s["sha256"]) for s in json.loads((folder / "manifest.json").read_text())["shards"]]


def test_ranks_split_shards_and_the_last_merges(tmp_path, embedder, corpus):
    single = encode_corpus(embedder, [corpus], tmp_path / "one", model_spec=STORIES, shard_size=7)
    assert single.shards_written == [0, 1, 2, 3, 4]
    first = encode_corpus(embedder, [corpus], tmp_path / "two", model_spec=STORIES, shard_size=7, rank=1,
                          world_size=2)
    assert first.shards_written == [1, 3] and not first.complete
    assert not (tmp_path / "two" / "manifest.json").exists()
    last = encode_corpus(embedder, [corpus], tmp_path / "two", model_spec=STORIES, shard_size=7, rank=0,
                         world_size=2)
    assert last.shards_written == [0, 2, 4] and last.complete and last.count == 30
    assert _shards(tmp_path / "two") == _shards(tmp_path / "one")
    # a resume may use another process count: 3 processes find everything done
    again = encode_corpus(embedder, [corpus], tmp_path / "two", model_spec=STORIES, shard_size=7, rank=2,
                          world_size=3)
    assert again.already_complete


def test_torchrun_two_cpu_processes_equal_one(tmp_path, embedder, corpus):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "0", "-m", "embedkit", "encode", str(STORIES),
           "--input", str(corpus), "--output", str(tmp_path / "dist"), "--shard-size", "7", "--dtype", "float32",
           "--max-length", "48"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0/2]" in proc.stdout and "[rank 1/2]" in proc.stdout
    assert proc.stdout.count("Wrote ") == 1 or proc.stdout.count("Wrote ") == 2  # the last finisher(s) merge
    encode_corpus(embedder, [corpus], tmp_path / "one", model_spec=STORIES, shard_size=7)
    dist, one = open_vectors(tmp_path / "dist"), open_vectors(tmp_path / "one")
    assert dist.count == 30 and dist.ids() == one.ids() == [str(i) for i in range(30)]
    assert [s["rows"] for s in dist.manifest["shards"]] == [[0, 7], [7, 14], [14, 21], [21, 28], [28, 30]]
    # one thread per process (torchrun) vs two here: same vectors up to float summation order
    np.testing.assert_allclose(dist.load(), one.load(), atol=1e-5)
