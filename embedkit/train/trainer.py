"""Run a recipe: stages in order, each a fresh LoRA adapter on the previous stages' merged model (LLM2Vec's
stacking), with checkpoints, exact resume, logging, and the final embedder written to ``<output_dir>/final``.

Run folder layout::

    <output_dir>/recipe.yaml                 the validated recipe (with its fingerprint)
    <output_dir>/checkpoints/                in-progress checkpoints + latest.json
    <output_dir>/stages/<stage>/adapter/     each stage's LoRA adapter (peft format)
    <output_dir>/stages/<stage>/embedder/    the merged embedder after the stage (save_merged: true)
    <output_dir>/metrics.csv, tb/, loss.png  logs; results.json: STS-B figures per stage
    <output_dir>/final/                      the trained embedder (Embedder.load / SentenceTransformer)

One process or several (``torchrun``; gloo on CPU): ``batch_size`` is the global batch; each process takes its
contiguous share, contrastive negatives are gathered across processes and gradients are summed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from embedkit.train import registry
from embedkit.train._atomic import atomic_write_text
from embedkit.train.checkpoint import (
    ResumeError,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from embedkit.train.data import BatchPlan, DataError, default_data_dir, shard
from embedkit.train.logs import MetricsLog
from embedkit.train.recipe import Recipe, RecipeError, load_recipe, recipe_dir
from embedkit.train.stages import Stage, StageContext

logger = logging.getLogger(__name__)
FINAL = "final"


ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION")


def launched_by_accelerate() -> bool:
    """``accelerate launch`` sets these; the run then lets accelerate wrap the model (DDP / FSDP / ZeRO)."""
    return any(name in os.environ for name in ACCELERATE_ENV)


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def lr_factor(name: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(spec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw_8bit":
        from embedkit.train.lora import require_bitsandbytes  # noqa: PLC0415

        require_bitsandbytes()
        import bitsandbytes as bnb  # noqa: PLC0415

        return bnb.optim.AdamW8bit(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def check_data(recipe: Recipe) -> tuple[Path | None, Path | None]:
    """Every stage's files exist, parse, and hold at least one batch: before any model loads."""
    data_dir = default_data_dir(recipe.data_dir)
    rdir = recipe_dir(recipe)
    problems = []
    for i, stage in enumerate(recipe.stages):
        cls = registry.STAGES[stage.objective][0]
        try:
            rows = cls.check_data(stage, data_dir, rdir)
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


class Run:
    """One execution of a recipe (one process's view)."""

    def __init__(self, recipe: Recipe, resume: bool | str):
        self.recipe = recipe
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        self.out = Path(recipe.output_dir)
        self.accelerator = None
        if launched_by_accelerate():
            from accelerate import Accelerator  # noqa: PLC0415

            self.accelerator = Accelerator()  # reads the launch config: FSDP / DeepSpeed / DDP plugins
        self.rank, self.world = init_distributed()
        self.main = self.rank == 0
        self.data_dir, self.recipe_dir = check_data(recipe)
        for i, stage in enumerate(recipe.stages):
            if stage.batch_size % self.world:
                raise RecipeError(f"stages.{i}.batch_size={stage.batch_size} must be divisible by the number of "
                                  f"processes ({self.world}): the batch size is global.")
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}.")
        self.resume_state = self._check_run_folder(resume)
        self.metrics = MetricsLog(self.out, recipe.logging, enabled=self.main)
        self.results: dict = {}

    # -- run folder ------------------------------------------------------------------------------------------
    def _check_run_folder(self, resume: bool | str) -> dict | None:
        saved = self.out / "recipe.yaml"
        ckpt_root = self.out / "checkpoints"
        if resume == "auto":
            resume = saved.is_file()
        if not resume:
            if saved.is_file() or (self.out / FINAL).exists():
                raise ResumeError(f"{self.out} already holds a run. Pass --resume to continue it, or choose another "
                                  "output_dir (or delete the folder) to start over.")
            return None
        if not saved.is_file():
            raise ResumeError(f"Nothing to resume in {self.out} (no recipe.yaml): run without --resume first.")
        old = yaml.safe_load(saved.read_text())
        old_fp = old.get("fingerprint") if isinstance(old, dict) else None
        if old_fp != self.recipe.fingerprint():
            diff = _diff(old.get("recipe", {}), self.recipe.model_dump(mode="json"))
            fields = ", ".join(diff) or "unknown"
            raise ResumeError(f"Refusing to resume {self.out}: it was started by a different recipe (fingerprint "
                              f"{old_fp} != {self.recipe.fingerprint()}); differing fields: {fields}. "
                              "Resume with the same recipe and overrides, or use a new output_dir.")
        if (self.out / FINAL / "embedkit.json").is_file():
            return {"stage": len(self.recipe.stages), "step": 0, "finished": True}
        path = latest_checkpoint(ckpt_root)
        if path is None:
            return {"stage": 0, "step": 0}
        state, params, opt = read_checkpoint(path)
        state.update(path=str(path), params=params, optimizer=opt)
        logger.info("Resuming from %s (stage %s, step %s)", path, state["stage"], state["step"])
        return state

    def _write_recipe(self) -> None:
        if self.main:
            atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(
                {"fingerprint": self.recipe.fingerprint(), "recipe": self.recipe.model_dump(mode="json")},
                sort_keys=False))

    # -- model -----------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        from embedkit.embedder import Embedder  # noqa: PLC0415
        from embedkit.train.lora import load_model, quantization_config  # noqa: PLC0415

        spec = self.recipe.model
        self.needs_head = any(registry.STAGES[s.objective][0].needs_lm_head for s in self.recipe.stages)
        from embedkit.backbone import resolve_dtype  # noqa: PLC0415

        dtype = resolve_dtype(spec.dtype)
        quant = quantization_config(self.recipe.lora, dtype)
        model, tokenizer = load_model(spec.base, dtype=dtype, with_lm_head=self.needs_head, quantization=quant,
                                      attn_implementation=spec.attn_implementation,
                                      trust_remote_code=spec.trust_remote_code)
        self.causal_lm = model if self.needs_head else None
        base = model.get_decoder() if self.needs_head else model
        if quant is not None:
            from peft import prepare_model_for_kbit_training  # noqa: PLC0415

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
        for param in model.parameters():
            param.requires_grad_(False)
        if spec.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.base = base
        self.tokenizer = tokenizer
        torch.manual_seed(_seed_for(self.recipe.seed, -1, -1, 0))  # a latent-attention pooler's init, same on resume
        self.embedder = Embedder.from_pretrained(
            spec.base, attention=spec.attention, pooling=spec.pooling, dtype=spec.dtype, max_length=spec.max_length,
            template=spec.template, query_instruction=spec.query_instruction,
            document_instruction=spec.document_instruction, latent_attention=spec.latent_attention, backbone=base,
            tokenizer=tokenizer)
        self.base_name = spec.base

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, label: str) -> None:
        splits = self.recipe.evaluate.sts_splits
        if not splits or not self.main:
            return
        from embedkit.evaluation.sts import sts_spearman  # noqa: PLC0415

        scores = {}
        saved = self.embedder.config.max_length
        self.embedder.config.max_length = self.recipe.evaluate.max_length
        try:
            for split in splits:
                scores[f"sts_{split}"] = round(sts_spearman(self.embedder, self.data_dir, split), 4)
        finally:
            self.embedder.config.max_length = saved
        self.results[label] = scores
        self.metrics.event(label, scores)
        logger.warning("STS-B %s: %s", label, scores)
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2))

    # -- stages ----------------------------------------------------------------------------------------------
    def _context(self, index: int) -> StageContext:
        cfg = self.recipe.stages[index]
        return StageContext(embedder=self.embedder, tokenizer=self.tokenizer, index=index, seed=self.recipe.seed,
                            data_dir=self.data_dir, recipe_dir=self.recipe_dir,
                            max_length=cfg.max_length or self.recipe.model.max_length, causal_lm=self.causal_lm)

    def _wrap(self, index: int):
        from embedkit.train.lora import wrap_lora  # noqa: PLC0415

        cfg = self.recipe.stages[index]
        torch.manual_seed(_seed_for(self.recipe.seed, index, 0, 0))  # same adapter init on every process
        # adapter_config.json names the recipe's base model; stack.json (beside it) lists the earlier stages'
        # adapters that must be merged into that base first.
        peft_model = wrap_lora(self.base, cfg.lora or self.recipe.lora, self.base_name)
        self.embedder.backbone = peft_model
        return peft_model

    def _merge(self, peft_model) -> None:
        """Fold the adapter into the weights in place (the LM head model shares the same modules)."""
        self.base = peft_model.merge_and_unload()
        self.embedder.backbone = self.base

    def _set_attention(self, index: int) -> None:
        mode = self.recipe.stages[index].attention or self.recipe.model.attention
        self.embedder.set_attention(mode)

    def replay_stage(self, index: int) -> None:
        """A finished stage on resume: re-apply its saved adapter and merge (no training)."""
        from peft import set_peft_model_state_dict  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        stage = self._make_stage(index)
        torch.manual_seed(_seed_for(self.recipe.seed, index, -1, 0))
        stage.setup_model()
        peft_model = self._wrap(index)
        adapter = self.out / "stages" / self.recipe.stage_name(index) / "adapter"
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        set_peft_model_state_dict(peft_model, weights)
        extra = adapter / "extra.safetensors"
        if extra.is_file():
            saved = load_file(str(extra))
            if "lm_head.weight" in saved:  # written before extras were saved by position
                self.causal_lm.get_output_embeddings().weight.data.copy_(saved["lm_head.weight"])
            for i, param in enumerate(stage.extra_parameters()):
                if f"extra.{i}" in saved:
                    param.data.copy_(saved[f"extra.{i}"])
        self._merge(peft_model)

    def _make_stage(self, index: int) -> Stage:
        cfg = self.recipe.stages[index]
        return registry.STAGES[cfg.objective][0](cfg, self._context(index))

    def run_stage(self, index: int, resume: dict | None) -> None:
        cfg = self.recipe.stages[index]
        name = self.recipe.stage_name(index)
        stage = self._make_stage(index)
        torch.manual_seed(_seed_for(self.recipe.seed, index, -1, 0))  # e.g. a new mask token's embedding
        stage.setup_model()
        peft_model = self._wrap(index)
        self._set_attention(index)
        stage.prepare()
        extra = stage.extra_parameters()
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        for i, p in enumerate(extra):
            named.setdefault(f"extra.{i}", p)
        params = list(named.values())
        optimizer = build_optimizer(cfg.optimizer, params)
        wrapped = self._accelerate(peft_model, optimizer) if self.accelerator is not None else None
        plan = BatchPlan(stage.num_rows(), cfg.batch_size, self.recipe.seed + 7919 * index, stage.groups())
        total = cfg.steps or max(1, math.ceil(cfg.epochs * plan.per_epoch))
        start = 0
        if resume is not None and resume.get("step", 0) > 0:
            loaded = resume["params"]
            missing = sorted(set(named) - set(loaded))
            if missing:
                raise ResumeError(f"Checkpoint {resume['path']} lacks trainable tensors {missing[:3]}...")
            with torch.no_grad():
                for key, param in named.items():
                    param.copy_(loaded[key])
            optimizer.load_state_dict(unflatten_optimizer(*resume["optimizer"]))
            start = int(resume["step"])
        schedule = None
        if cfg.attention_schedule is not None:
            factory = registry.ATTENTION_SCHEDULES[cfg.attention_schedule.name]
            schedule = factory(cfg.attention_schedule.settings, cfg, total)
        self.embedder.train()
        show = self.main and self.recipe.logging.progress_bar
        bar = tqdm(total=total, initial=start, desc=name, disable=not show, unit="step", dynamic_ncols=True)
        tokens_window, time_window = 0, 0.0
        try:
            with stage.active():
                for step in range(start, total):
                    began = time.perf_counter()
                    torch.manual_seed(_seed_for(self.recipe.seed, index, step, self.rank))
                    if schedule is not None:
                        schedule(step, self.embedder)
                    rows = shard(plan.batch(step), self.rank, self.world)
                    factor = lr_factor(cfg.schedule.name, step, total, cfg.schedule.warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.optimizer.lr * factor
                    optimizer.zero_grad(set_to_none=True)
                    result = stage.step(rows, step)
                    loss, tokens = self._sync(params, result.loss, result.tokens)
                    if cfg.optimizer.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
                    optimizer.step()
                    tokens_window += tokens
                    time_window += time.perf_counter() - began
                    done = step + 1
                    if done % self.recipe.logging.every == 0 or done == total:
                        rate = tokens_window / max(time_window, 1e-9)
                        self.metrics.log(index, name, done, loss=loss, lr=cfg.optimizer.lr * factor, tokens_per_s=rate)
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                        tokens_window, time_window = 0, 0.0
                    bar.update(1)
                    every = self.recipe.checkpoint.every
                    if every and done % every == 0 and done < total:
                        self._checkpoint({"stage": index, "step": done}, named, optimizer)
        finally:
            bar.close()
            if schedule is not None:
                self.embedder.attention_bias = None
            if wrapped is not None:
                self.embedder.forward_hook = None
        self.embedder.eval()
        report = stage.report()
        if report and self.main:
            self.metrics.event(f"{name} stage", report)
            logger.warning("%s stage: %s", name, report)
        self._finish_stage(index, peft_model, extra, wrapped)

    def _accelerate(self, peft_model, optimizer):
        """Under ``accelerate launch``: let accelerate wrap the adapter model (DDP, FSDP or DeepSpeed, as its
        config says) and run the embedder's forward through the wrapper. The unwrapped model stays the one
        whose adapter is saved and merged."""
        from embedkit import attention as attn  # noqa: PLC0415

        wrapped = self.accelerator.prepare_model(peft_model)

        def forward(embedder, input_ids, attention_mask):
            inputs = attn.model_inputs(peft_model, input_ids, attention_mask, embedder.attention_bias)
            return wrapped(**inputs, use_cache=False).last_hidden_state
        self.embedder.forward_hook = forward
        return wrapped

    def _sync(self, params, loss: float, tokens: int) -> tuple[float, int]:
        """Sum gradients, loss and token counts over processes (each process's loss is its share)."""
        if self.world == 1:
            return loss, tokens
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.accelerator is not None:
                p.grad.mul_(self.world)  # the wrapper averaged the gradients; our losses are shares of a sum
            else:
                dist.all_reduce(p.grad)
        stats = torch.tensor([loss, float(tokens)], dtype=torch.float64)
        dist.all_reduce(stats)
        return float(stats[0]), int(stats[1])

    def _checkpoint(self, state: dict, named: dict | None, optimizer) -> None:
        if self.main:
            name = f"stage{state['stage']:02d}-step{state['step']:08d}"
            state = {**state, "fingerprint": self.recipe.fingerprint()}
            save_checkpoint(self.out / "checkpoints", name, state, named, optimizer, self.recipe.checkpoint.keep)
        _barrier(self.world)

    def _finish_stage(self, index: int, peft_model, extra, wrapped=None) -> None:
        cfg = self.recipe.stages[index]
        full = contextlib.nullcontext()
        if wrapped is not None and type(wrapped).__name__ == "FullyShardedDataParallel":
            full = type(wrapped).summon_full_params(wrapped, writeback=True)  # whole weights to save and merge
        with full:
            self._save_and_merge(index, peft_model, extra)
        self.embedder.set_attention(self.recipe.model.attention)
        if self.main and cfg.save_merged:
            self.embedder.save(self.out / "stages" / self.recipe.stage_name(index) / "embedder")
        self.evaluate(f"after {self.recipe.stage_name(index)}")
        self._checkpoint({"stage": index + 1, "step": 0}, None, None)

    def _save_and_merge(self, index: int, peft_model, extra) -> None:
        folder = self.out / "stages" / self.recipe.stage_name(index)
        if self.main:
            from embedkit.train._atomic import atomic_write_dir  # noqa: PLC0415

            def fill(tmp: Path) -> None:
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
                stack = [f"../../{self.recipe.stage_name(j)}/adapter" for j in range(index)]
                (tmp / "stack.json").write_text(json.dumps({
                    "base_model": self.base_name, "merge_first": stack,
                    "note": "merge these adapters into base_model, in order, before applying this one"}, indent=2))
                if extra:
                    from safetensors.torch import save_file  # noqa: PLC0415

                    save_file({f"extra.{i}": p.detach().contiguous().cpu() for i, p in enumerate(extra)},
                              str(tmp / "extra.safetensors"))
            atomic_write_dir(folder / "adapter", fill)
        self._merge(peft_model)

    # -- everything ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        final = self.out / FINAL
        state = self.resume_state or {"stage": 0, "step": 0}
        if state.get("finished"):
            logger.warning("%s is already finished; nothing to do.", self.out)
            return final
        if self.resume_state is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_recipe()
        self.metrics.open(resume_at=(state["stage"], state["step"]) if self.resume_state else None)
        self.load_model()
        if self.recipe.evaluate.before and self.resume_state is None:
            self.embedder.set_attention(self.recipe.model.attention)
            self.evaluate("before training")
        elif self.main and (self.out / "results.json").is_file():
            self.results = json.loads((self.out / "results.json").read_text())
        for index in range(len(self.recipe.stages)):
            if index < state["stage"]:
                self.replay_stage(index)
            else:
                self.run_stage(index, state if index == state["stage"] else None)
        self.embedder.set_attention(self.recipe.model.attention)
        if getattr(self.base.config, "quantization_config", None) is not None:
            # QLoRA: the adapters are merged into 4/8-bit weights; save plain weights so that loading the
            # embedder needs no bitsandbytes
            from embedkit.backbone import resolve_dtype  # noqa: PLC0415

            self.base = self.base.dequantize(dtype=resolve_dtype(self.recipe.model.dtype))
            self.embedder.backbone = self.base
        if self.main:
            self.embedder.save(final)
            self.metrics.close()
        _barrier(self.world)
        return final


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else []
    if not keys:
        return [prefix.rstrip(".")] if old != new else []
    out = []
    for key in keys:
        if key in ("logging", "checkpoint", "evaluate", "output_dir", "name", "threads") and not prefix:
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


def run_recipe(path_or_recipe: str | os.PathLike | dict | Recipe, overrides: list[str] | dict | None = None,
               resume: bool | str = False) -> Path:
    """Validate a recipe (file, dict or Recipe) with ``key.sub=value`` overrides, train it, and return the
    folder of the final embedder (``<output_dir>/final``).

    ``resume``: False starts a new run (refused if ``output_dir`` holds one), True continues the run there
    (a finished run returns at once), ``"auto"`` continues if there is a run and starts one otherwise."""
    recipe = load_recipe(path_or_recipe, overrides)
    with contextlib.ExitStack():
        return Run(recipe, resume).run()
