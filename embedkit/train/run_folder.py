"""The run folder: start or resume, stale temporaries, checkpoints, and each stage's adapter (LoRA stacking).

Layout::

    <output_dir>/recipe.yaml                 the validated recipe (with its fingerprint)
    <output_dir>/checkpoints/                in-progress checkpoints + latest.json
    <output_dir>/stages/<stage>/adapter/     each stage's LoRA adapter (peft format) + stack.json
    <output_dir>/stages/<stage>/embedder/    the merged embedder after the stage (save_merged: true)
    <output_dir>/metrics.csv, tb/, loss.png  logs; results.json: STS-B figures per stage
    <output_dir>/final/                      the trained embedder (Embedder.load / SentenceTransformer)

A folder that holds a recipe but no finished step (no checkpoint, no final: e.g. the model failed to load) is
started over, with or without ``--resume`` and whatever its recipe: there is nothing to lose.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from embedkit.io import atomic_write_dir, atomic_write_json, atomic_write_text, child_path, remove_stale_temps
from embedkit.train.checkpoint import ResumeError, latest_checkpoint, read_checkpoint, save_checkpoint
from embedkit.train.recipe import NOT_FINGERPRINTED, Recipe

logger = logging.getLogger(__name__)
FINAL = "final"


class RunFolder:
    """One run's output folder, as seen by one process (only the main process writes)."""

    def __init__(self, recipe: Recipe, main: bool = True):
        self.recipe, self.main = recipe, main
        self.out = Path(recipe.output_dir)
        self.checkpoints = self.out / "checkpoints"

    # -- start or resume -------------------------------------------------------------------------------------
    def open(self, resume: bool | str) -> dict | None:
        """None for a fresh start, else the state to resume from (``finished`` when the run is done)."""
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}.")
        if self.main:
            self.remove_stale_temps()
        saved = self.out / "recipe.yaml"
        if resume == "auto":
            resume = saved.is_file()
        restartable = saved.is_file() and not self._has_progress()
        if restartable and (not resume or self._saved_fingerprint() != self.recipe.fingerprint()):
            logger.warning("%s holds a run that finished no step (recipe.yaml only, e.g. its model failed to "
                           "load): starting it over with this recipe.", self.out)
            return None
        if not resume:
            if saved.is_file() or (self.out / FINAL).exists():
                raise ResumeError(f"{self.out} already holds a run. Pass --resume to continue it, or choose another "
                                  "output_dir (or delete the folder) to start over.")
            return None
        if not saved.is_file():
            raise ResumeError(f"Nothing to resume in {self.out} (no recipe.yaml): run without --resume first.")
        old_fp = self._saved_fingerprint()
        if old_fp != self.recipe.fingerprint():
            old = yaml.safe_load(saved.read_text())
            diff = _diff(old.get("recipe", {}) if isinstance(old, dict) else {}, self.recipe.model_dump(mode="json"))
            raise ResumeError(f"Refusing to resume {self.out}: it was started by a different recipe (fingerprint "
                              f"{old_fp} != {self.recipe.fingerprint()}); differing fields: "
                              f"{', '.join(diff) or 'unknown'}. Resume with the same recipe and overrides, or use a "
                              "new output_dir.")
        if (self.out / FINAL / "embedkit.json").is_file():
            return {"stage": len(self.recipe.stages), "step": 0, "finished": True}
        path = latest_checkpoint(self.checkpoints)
        if path is None:
            return {"stage": 0, "step": 0}
        state, params, opt = read_checkpoint(path)
        state.update(path=str(path), params=params, optimizer=opt)
        logger.info("Resuming from %s (stage %s, step %s)", path, state["stage"], state["step"])
        return state

    def _has_progress(self) -> bool:
        return (self.out / FINAL).exists() or latest_checkpoint(self.checkpoints) is not None

    def _saved_fingerprint(self) -> str | None:
        old = yaml.safe_load((self.out / "recipe.yaml").read_text())
        return old.get("fingerprint") if isinstance(old, dict) else None

    def remove_stale_temps(self) -> int:
        """Temporary files and folders a killed writer left (``.<name>.tmp.*`` folders, ``.<name>.tmp-*``
        files) in the run folder, checkpoints/ and each stage folder; finished outputs are never touched."""
        folders = [self.out, self.checkpoints, *sorted((self.out / "stages").glob("*/"))]
        removed = 0
        for folder in folders:
            removed += remove_stale_temps(folder)
            for tmp in folder.glob(".*.tmp.*") if folder.is_dir() else ():
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        if removed:
            logger.warning("Removed %d temporary file(s)/folder(s) left by an interrupted run in %s.", removed,
                           self.out)
        return removed

    def write_recipe(self) -> None:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(
                {"fingerprint": self.recipe.fingerprint(), "recipe": self.recipe.model_dump(mode="json")},
                sort_keys=False))

    def write_run_info(self, info: dict) -> None:
        """run.json: the machine, dtype and threads this run used (a speed figure means nothing without them)."""
        if self.main:
            atomic_write_json(self.out / "run.json", info)

    # -- checkpoints and stage outputs ---------------------------------------------------------------------------
    def checkpoint(self, state: dict, named: dict | None, optimizer) -> None:
        if self.main:
            name = f"stage{state['stage']:02d}-step{state['step']:08d}"
            state = {**state, "fingerprint": self.recipe.fingerprint()}
            save_checkpoint(self.checkpoints, name, state, named, optimizer, self.recipe.checkpoint.keep)

    def stage_dir(self, index: int) -> Path:
        return child_path(self.out / "stages", self.recipe.stage_name(index), "stage name")

    def save_adapter(self, index: int, peft_model, extra: list[torch.nn.Parameter], base_name: str) -> None:
        """The stage's adapter; ``stack.json`` lists the earlier stages' adapters to merge into the base first."""
        if not self.main:
            return

        def fill(tmp: Path) -> None:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            stack = [f"../../{self.recipe.stage_name(j)}/adapter" for j in range(index)]
            (tmp / "stack.json").write_text(json.dumps({
                "base_model": base_name, "merge_first": stack,
                "note": "merge these adapters into base_model, in order, before applying this one"}, indent=2))
            if extra:
                save_file({f"extra.{i}": p.detach().contiguous().cpu() for i, p in enumerate(extra)},
                          str(tmp / "extra.safetensors"))
        atomic_write_dir(self.stage_dir(index) / "adapter", fill)

    def load_adapter(self, index: int, peft_model, extra: list[torch.nn.Parameter]) -> None:
        """A finished stage's saved adapter (and extra trained tensors) into ``peft_model`` and ``extra``."""
        from peft import set_peft_model_state_dict  # noqa: PLC0415  (peft: a heavy import, only on resume)

        adapter = self.stage_dir(index) / "adapter"
        set_peft_model_state_dict(peft_model, load_file(str(adapter / "adapter_model.safetensors")))
        if (adapter / "extra.safetensors").is_file():
            saved = load_file(str(adapter / "extra.safetensors"))
            for i, param in enumerate(extra):
                if f"extra.{i}" in saved:
                    param.data.copy_(saved[f"extra.{i}"])


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two recipe dumps (weights-relevant fields only)."""
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else []
    if not keys:
        return [prefix.rstrip(".")] if old != new else []
    out = []
    for key in keys:
        if key in NOT_FINGERPRINTED and not prefix:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += _diff(x, y, f"{prefix}{key}.{i}.") if isinstance(x, dict) else (
                    [f"{prefix}{key}.{i}"] if x != y else [])
        elif isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
