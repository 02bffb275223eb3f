"""Atomic writes (embedkit.io): whole file or old file, never a torn one; no temp files left behind."""

import hashlib
import json

import numpy as np
import pytest

from embedkit.io import (
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    sha256_file,
)


def test_writes_land_whole_and_leave_no_temp(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "sub" / "c.json", {"x": [1, 2]})
    atomic_save_npy(tmp_path / "d.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": [1, 2]}
    assert np.load(tmp_path / "d.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "d.npy", "sub"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_npy_refuses_object_arrays(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        atomic_save_npy(tmp_path / "x.npy", np.array(["a", None], dtype=object))


def test_stale_temps_are_removed_by_prefix(tmp_path):
    (tmp_path / ".shard-00001.npy.tmp-abc").write_bytes(b"x")
    (tmp_path / ".shard-00002.npy.tmp-def").write_bytes(b"x")
    (tmp_path / "shard-00001.npy").write_bytes(b"keep")
    assert remove_stale_temps(tmp_path, "shard-00001") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shard-00002.npy.tmp-def", "shard-00001.npy"]
    assert sha256_file(tmp_path / "shard-00001.npy") == hashlib.sha256(b"keep").hexdigest()
