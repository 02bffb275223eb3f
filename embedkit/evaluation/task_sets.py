"""Task sets: named lists of task folders (``--task-set quick``). The shipped ones are package data in
``embedkit/evaluation/tasksets/``, read with importlib.resources, so they exist in an installed wheel too."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TASK_SETS = "tasksets"  # package data beside this module: <name>.txt


def shipped_task_sets():
    """The folder of task sets that ships with embedkit (package data: present in an installed wheel too)."""
    return resources.files("embedkit.evaluation") / TASK_SETS


def task_set_names(sets_dir=None) -> list[str]:
    folder = sets_dir if sets_dir is not None else shipped_task_sets()
    return sorted(p.name.removesuffix(".txt") for p in folder.iterdir() if p.name.endswith(".txt")) \
        if folder.is_dir() else []


def read_task_set(name_or_path: str, data_dir: Path, sets_dir=None) -> list[Path]:
    """A task set: a file, or a name in ``sets_dir`` (default: the shipped sets); one task folder per line
    (relative to the data folder, or absolute); '#' comments."""
    path = Path(name_or_path)
    source = path
    if not path.is_file():
        source = (sets_dir if sets_dir is not None else shipped_task_sets()) / f"{name_or_path}.txt"
    if not source.is_file():
        raise FileNotFoundError(f"Task set {name_or_path!r} not found (neither a file nor {source}); known sets: "
                                f"{', '.join(task_set_names(sets_dir)) or 'none'}.")
    folders = []
    for line in source.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            folders.append(Path(line) if Path(line).is_absolute() else data_dir / line)
    if not folders:
        raise ValueError(f"Task set {source} lists no task folders.")
    return folders
