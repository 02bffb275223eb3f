"""Regenerate the golden outputs that tests/test_golden.py compares against. Run ONLY on purpose, when a
change of behaviour is intended and reviewed (never from the test suite; pytest does not collect this file):

    PYTHONPATH=$PWD .venv/bin/python tests/golden/make_golden.py

Writes tests/golden/{vectors-*.npy, cases.json, losses.json, index.json, saved-embedder-v0.npy}. The saved
folder tests/fixtures/saved-embedder-v0/ is written only when missing: it stands for a folder saved by an old
version, so it is never rewritten; its vectors are those of the embedder that was saved.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import golden_cases as g  # noqa: E402


def write_json(name: str, data) -> None:
    (g.GOLDEN / name).write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    cases = {}
    for group, make in g.vector_groups().items():
        names, vectors = [], []
        for name, compute in make():
            names.append(name)
            vectors.append(np.asarray(compute(), dtype=np.float32))
        np.save(g.GOLDEN / f"vectors-{group}.npy", np.stack(vectors), allow_pickle=False)
        cases[group] = names
    write_json("cases.json", cases)
    write_json("losses.json", {name: g.train_losses(name) for name in g.TRAIN_RECIPES})
    with tempfile.TemporaryDirectory() as tmp:
        write_json("index.json", g.index_results(Path(tmp)))
    embedder = g.fixture_embedder()
    np.save(g.GOLDEN / "saved-embedder-v0.npy", g.fixture_vectors(embedder).astype(np.float32), allow_pickle=False)
    if not g.FIXTURE.exists():
        g.FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        embedder.save(g.FIXTURE)
        shutil.rmtree(g.FIXTURE / "__pycache__", ignore_errors=True)
    print(f"wrote {g.GOLDEN}")


if __name__ == "__main__":
    main()
