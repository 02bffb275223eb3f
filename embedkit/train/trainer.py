"""Run a recipe: stages in order, each a fresh LoRA adapter on the previous stages' merged model (LLM2Vec's
stacking), with checkpoints, exact resume, logging, and the final embedder written to ``<output_dir>/final``
(layout: ``run_folder.py``).

The stage loop lives here, and so does the one backward: an objective returns its loss on this process's
rows, the trainer divides it by its share of the global batch, calls backward and sums gradients over
processes. One process or several (``torchrun``; gloo on CPU): ``batch_size`` is the global batch; each
process takes its contiguous share, contrastive negatives are gathered across processes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from embedkit import distributed
from embedkit.compilation import compile_decoder_layers, compile_pays
from embedkit.hardware import apply_thread_policy, describe_cpu
from embedkit.train.checkpoint import ResumeError, unflatten_optimizer
from embedkit.train.data import BatchPlan, DataError, default_data_dir, shard
from embedkit.train.evaluate import StsReport
from embedkit.train.logs import MetricsLog
from embedkit.train.losses import Loss
from embedkit.train.model import TrainModel
from embedkit.train.objectives import OBJECTIVES, Objective, ObjectiveContext
from embedkit.train.optim import build_optimizer, set_lr
from embedkit.train.parallel import Parallel
from embedkit.train.recipe import Recipe, RecipeError, load_recipe, recipe_dir
from embedkit.train.run_folder import FINAL, RunFolder
from embedkit.train.schedules import ATTENTION_SCHEDULES, lr_factor

logger = logging.getLogger(__name__)


def check_data(recipe: Recipe) -> tuple[Path | None, Path | None]:
    """Every stage's files exist, parse, and hold at least one batch: before any model loads."""
    data_dir = default_data_dir(recipe.data_dir)
    rdir = recipe_dir(recipe)
    problems = []
    for i, stage in enumerate(recipe.stages):
        try:
            rows = OBJECTIVES[stage.objective].check_data(stage, data_dir, rdir)
        except DataError as err:
            problems.append(f"stages.{i} ({stage.objective}): {err}")
            continue
        if stage.batch_size > rows:
            problems.append(f"stages.{i} ({stage.objective}): batch_size={stage.batch_size} is larger than the data "
                            f"({rows} rows in {', '.join(stage.data.paths)}); lower batch_size or add data.")
    if problems:
        raise DataError(f"{recipe.source or '<recipe>'}: " + "\n".join(problems))
    return data_dir, rdir


def _seed_for(seed: int, stage: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + step * 101 + rank) % (2**63 - 1)


def backward(loss: Loss) -> float:
    """The one backward: this process's loss as its share of the global batch (its sum over the sum of every
    process's ``count``), then GradCache's second pass if any. Returns the share."""
    (total,) = distributed.all_reduce_sum([loss.count])
    scaled = loss.value / max(total, 1.0)
    scaled.backward()
    if loss.finish is not None:
        loss.finish()
    return float(scaled.detach())


class Trainer:
    """One execution of a recipe (one process's view)."""

    def __init__(self, recipe: Recipe, resume: bool | str):
        self.recipe = recipe
        self.threads = apply_thread_policy(recipe.threads)
        self.parallel = Parallel()
        self.data_dir, self.recipe_dir = check_data(recipe)
        for i, stage in enumerate(recipe.stages):
            if stage.batch_size % self.parallel.world:
                raise RecipeError(f"stages.{i}.batch_size={stage.batch_size} must be divisible by the number of "
                                  f"processes ({self.parallel.world}): the batch size is global.")
        self.folder = RunFolder(recipe, self.parallel.main)
        self.resume_state = self.folder.open(resume)
        self.metrics = MetricsLog(self.folder.out, recipe.logging, enabled=self.parallel.main)
        self.sts = StsReport(recipe.evaluate, self.data_dir, self.folder.out, self.metrics, self.parallel.main)
        self.model: TrainModel | None = None

    def load_model(self) -> None:
        needs_head = any(OBJECTIVES[s.objective].needs_lm_head for s in self.recipe.stages)
        self.model = TrainModel(self.recipe.model, self.recipe.lora, needs_head,
                                _seed_for(self.recipe.seed, -1, -1, 0))
        # in place: the adapters, merges and saved weights see the same modules
        if compile_pays(self.recipe.compile, self.model.base):
            compile_decoder_layers(self.model.base)
        for i, stage in enumerate(self.recipe.stages):  # before any stage trains: no work is lost
            problem = OBJECTIVES[stage.objective].check_model(stage, self.embedder)
            if problem:
                raise RecipeError(f"{self.recipe.source or '<recipe>'}: stages.{i}.{problem}")

    @property
    def embedder(self):
        return self.model.embedder

    # -- one stage -------------------------------------------------------------------------------------------
    def make_objective(self, index: int) -> Objective:
        cfg = self.recipe.stages[index]
        ctx = ObjectiveContext(embedder=self.embedder, tokenizer=self.model.tokenizer, index=index,
                               seed=self.recipe.seed, data_dir=self.data_dir, recipe_dir=self.recipe_dir,
                               max_length=cfg.max_length or self.recipe.model.max_length,
                               causal_lm=self.model.causal_lm, run_dir=self.folder.out)
        return OBJECTIVES[cfg.objective](cfg, ctx)

    def start_stage(self, index: int) -> tuple[Objective, object]:
        """The stage's objective with its model changes made and a fresh adapter (seeded: same on resume)."""
        objective = self.make_objective(index)
        torch.manual_seed(_seed_for(self.recipe.seed, index, -1, 0))  # e.g. a new token's embedding
        objective.setup_model()
        torch.manual_seed(_seed_for(self.recipe.seed, index, 0, 0))  # same adapter init on every process
        peft_model = self.model.wrap(self.recipe.stages[index].lora or self.recipe.lora)
        return objective, peft_model

    def replay_stage(self, index: int) -> None:
        """A finished stage on resume: re-apply its saved adapter and merge (no training)."""
        objective, peft_model = self.start_stage(index)
        self.folder.load_adapter(index, peft_model, objective.extra_parameters())
        self.model.merge(peft_model)

    def run_stage(self, index: int, resume: dict | None) -> None:
        cfg = self.recipe.stages[index]
        objective, peft_model = self.start_stage(index)
        self.embedder.set_attention(cfg.attention or self.recipe.model.attention)
        objective.prepare()
        extra = objective.extra_parameters()
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        for i, p in enumerate(extra):
            named.setdefault(f"extra.{i}", p)
        optimizer = build_optimizer(cfg.optimizer, list(named.values()))
        with self.parallel.stage(self.embedder, peft_model):
            plan = BatchPlan(objective.num_rows(), cfg.batch_size, self.recipe.seed + 7919 * index, objective.groups())
            total = cfg.steps or max(1, math.ceil(cfg.epochs * plan.per_epoch))
            objective.prepare_steps(plan.rows(range(total)))
            start = self._restore(resume, named, optimizer)
            schedule = None
            if cfg.attention_schedule is not None:
                factory = ATTENTION_SCHEDULES[cfg.attention_schedule.name]
                schedule = factory(cfg.attention_schedule.settings, cfg, total)
            self.embedder.train()
            try:
                with objective.active():
                    self._steps(index, objective, plan, range(start, total), named, optimizer, schedule)
            finally:
                if schedule is not None:
                    self.embedder.attention_bias = None  # the schedule's bias ends with its stage
        self.embedder.eval()
        report = objective.report()
        if report and self.parallel.main:
            self.metrics.event(f"{self.recipe.stage_name(index)} stage", report)
            logger.warning("%s stage: %s", self.recipe.stage_name(index), report)
        self._finish_stage(index, peft_model, extra)

    def _restore(self, resume: dict | None, named: dict, optimizer) -> int:
        """The step to start at: 0, or a checkpoint's step with its tensors and optimiser state loaded."""
        if resume is None or resume.get("step", 0) <= 0:
            return 0
        loaded = resume["params"]
        missing = sorted(set(named) - set(loaded))
        if missing:
            raise ResumeError(f"Checkpoint {resume['path']} lacks trainable tensors {missing[:3]}...")
        with torch.no_grad():
            for key, param in named.items():
                param.copy_(loaded[key])
        optimizer.load_state_dict(unflatten_optimizer(*resume["optimizer"]))
        return int(resume["step"])

    def _steps(self, index: int, objective: Objective, plan: BatchPlan, steps: range, named: dict, optimizer,
               schedule) -> None:
        """The optimisation steps of one stage: loss, backward, sync, clip, step; logs and checkpoints."""
        cfg, recipe, parallel = self.recipe.stages[index], self.recipe, self.parallel
        name, params = recipe.stage_name(index), list(named.values())
        bar = tqdm(total=steps.stop, initial=steps.start, desc=name, unit="step", dynamic_ncols=True,
                   disable=not (parallel.main and recipe.logging.progress_bar))
        tokens_window, time_window = 0, 0.0
        try:
            for step in steps:
                began = time.perf_counter()
                torch.manual_seed(_seed_for(recipe.seed, index, step, parallel.rank))
                if schedule is not None:
                    schedule(step, self.embedder)
                rows = shard(plan.batch(step), parallel.rank, parallel.world)
                lr = cfg.optimizer.lr * lr_factor(cfg.schedule.name, step, steps.stop, cfg.schedule.warmup_steps)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                result = objective.loss(rows, step)
                loss, tokens = parallel.sync(params, backward(result), result.tokens)
                if cfg.optimizer.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
                optimizer.step()
                tokens_window += tokens
                time_window += time.perf_counter() - began
                done = step + 1
                if done % recipe.logging.every == 0 or done == steps.stop:
                    rate = tokens_window / max(time_window, 1e-9)
                    self.metrics.log(index, name, done, loss=loss, lr=lr, tokens_per_s=rate)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                    tokens_window, time_window = 0, 0.0
                bar.update(1)
                if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < steps.stop:
                    self._checkpoint({"stage": index, "step": done}, named, optimizer)
        finally:
            bar.close()

    def _checkpoint(self, state: dict, named: dict | None, optimizer) -> None:
        self.folder.checkpoint(state, named, optimizer)
        distributed.barrier()

    def _finish_stage(self, index: int, peft_model, extra) -> None:
        with self.parallel.full_params():  # FSDP: the whole weights to save and merge
            self.folder.save_adapter(index, peft_model, extra, self.recipe.model.base)
            self.model.merge(peft_model)
        self.embedder.set_attention(self.recipe.model.attention)
        if self.parallel.main and self.recipe.stages[index].save_merged:
            self.embedder.save(self.folder.stage_dir(index) / "embedder")
        self.sts.evaluate(self.embedder, f"after {self.recipe.stage_name(index)}")
        self._checkpoint({"stage": index + 1, "step": 0}, None, None)

    # -- everything ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        final = self.folder.out / FINAL
        state = self.resume_state or {"stage": 0, "step": 0}
        if state.get("finished"):
            logger.warning("%s is already finished; nothing to do.", self.folder.out)
            return final
        if self.resume_state is None:
            self.folder.write_recipe()
        self.metrics.open(resume_at=(state["stage"], state["step"]) if self.resume_state else None)
        self.load_model()
        machine, dtype = describe_cpu(), str(self.embedder.backbone.dtype).removeprefix("torch.")
        threads_from = "recipe" if self.recipe.threads else "CPUs this process may use"
        self.folder.write_run_info({"machine": machine, "dtype": dtype, "threads": self.threads,
                                    "threads_from": threads_from})
        logger.warning("training on %s (%s), %s, %d torch threads (%s)", machine["cpu"], machine["isa"], dtype,
                       self.threads, threads_from)
        if self.recipe.evaluate.before and self.resume_state is None:
            self.embedder.set_attention(self.recipe.model.attention)
            self.sts.evaluate(self.embedder, "before training")
        else:
            self.sts.reload()
        for index in range(len(self.recipe.stages)):
            if index < state["stage"]:
                self.replay_stage(index)
            else:
                self.run_stage(index, state if index == state["stage"] else None)
        self.model.finalize()
        if self.parallel.main:
            self.embedder.save(final)
            self.metrics.close()
        distributed.barrier()
        return final


def run_recipe(path_or_recipe: str | os.PathLike | dict | Recipe, overrides: list[str] | dict | None = None,
               resume: bool | str = False) -> Path:
    """Validate a recipe (file, dict or Recipe) with ``key.sub=value`` overrides, train it, and return the
    folder of the final embedder (``<output_dir>/final``).

    ``resume``: False starts a new run (refused if ``output_dir`` holds one with a finished step), True
    continues the run there (a finished run returns at once), ``"auto"`` continues if there is a run and
    starts one otherwise."""
    return Trainer(load_recipe(path_or_recipe, overrides), resume).run()
