"""Training speed with LoRA: embedkit's trainer vs sentence-transformers' own trainer (MultipleNegativesRankingLoss),
same model, batch, data and LoRA, in one run; tokens/s and MFU against a matmul peak in
the run's dtype measured beside each.

    .venv/bin/python bench/bench_train.py [--objective supervised|simcse] [--model smollm2-135m] [--steps 6]
        [--embedkit ""] [--embedkit "lora.layers=top 12"] [--embedkit "batch_size=64;+fused_adamw"] [--st all]
        [--st "top 12"]

Each ``--embedkit VARIANT`` is one embedkit run: ``;``-separated recipe overrides (``lora.*`` / ``model.*`` as in
the recipe, ``compile=true``; any other key is the stage's, e.g. ``batch_size=64``), plus ``+compile`` (the same as
``compile=true``: torch.compile of the decoder layers, forward and backward), the bench-only levers ``+fused_adamw``
(torch's fused CPU AdamW) and ``+per_tower`` (``sort_by_length=off``: one padded pass per tower, as before
towers.py). Each ``--st LAYERS`` is one sentence-transformers run with LoRA on ``all`` layers or the ``top N``.

The objectives mirror the shipped recipes: ``supervised`` is the supervised stage of
recipes/llm2vec-smollm2-supervised-cpu.yaml (SNLI triplets, PromptEOL template, last-token pooling, causal,
batch 32, max_length 40, one hard negative); ``simcse`` is SimCSE on WikiText2 sentences (mean pooling, batch 16,
max_length 48). sentence-transformers gets the same texts (the template applied to them), the same pooling, LoRA
r16 through peft's ``inject_adapter_in_model`` (adapters in the model's dtype) and its defaults otherwise.

Tokens/s counts real (non-padding) tokens over the timed steps (the warm-up steps and model loading excluded).
MFU = tokens/s x training FLOPs per token / the peak: FLOPs count the forward through every layer, the backward
(input gradients, no weight gradients of frozen weights) through the adapted layers only, attention on the real
lengths, and the LoRA matmuls; the peak is the best of the model's linear shapes as a 4096-token matmul in the
run's dtype (bench_encode.matmul_peak), measured before and after each run and averaged. MFU counts every text's
tokens, which is what sentence-transformers computes; where embedkit's packed forward computes a shared prefix once
per row, ``computed_per_token`` (positions computed / tokens counted, below 1) says how much less it ran, and
MFU x computed_per_token is the share of the peak it really used. The machine is shared:
compare the lines of one run. Results are appended to bench/results_train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_encode import flops_per_token, matmul_peak

from embedkit.backbone import resolve_dtype
from embedkit.hardware import describe_cpu

PROMPTEOL = 'This sentence : "{text}" means in one word:"'
OBJECTIVES = {  # the shipped recipes' settings of each stage
    "supervised": {"batch": 32, "max_length": 40, "template": PROMPTEOL, "pooling": "last", "attention": "causal",
                   "lr": 3e-4},
    "simcse": {"batch": 16, "max_length": 48, "template": None, "pooling": "mean", "attention": "causal",
               "lr": 3e-5},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BENCH_FLAGS = ("+compile", "+fused_adamw", "+per_tower")


def read_rows(objective: str, n: int) -> list[dict]:
    from embedkit.datasets import find_data_dir

    data = find_data_dir()
    if objective == "simcse":
        lines = (data / "unlabeled" / "WikiText2" / "sentences.txt").read_text().splitlines()[:n]
        return [{"text": line} for line in lines]
    lines = (data / "triplets" / "SNLI" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def train_flops_per_token(config, avg_len: float, adapted: int, r: int) -> float:
    """Forward through every layer, plus the backward's input gradients and the LoRA matmuls (forward 2r(in+out)
    per adapted projection, backward twice that) in the adapted layers."""
    d, ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = d * q + 2 * d * kv + q * d + 3 * d * ff
    lora_io = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d)
    backward = 2 * linear + 8 * avg_len * q  # dX of every projection; attention's two matmuls, twice
    return flops_per_token(config, avg_len) + adapted * (backward + 6 * r * lora_io)


def parse_variant(variant: str) -> tuple[list[str], set[str]]:
    """``a=1;b=2;+compile`` -> recipe overrides (stage keys prefixed ``stages.0.``) and bench flags."""
    overrides, flags = [], set()
    for part in filter(None, (p.strip() for p in variant.split(";"))):
        if part == "+per_tower":  # the code before the towers were sorted together: one padded pass per tower
            overrides.append("stages.0.sort_by_length=off")
        elif part == "+compile":  # now the recipe key; the flag stays for the commands in docs/training.md
            overrides.append("compile=true")
        elif part.startswith("+"):
            if part not in BENCH_FLAGS:
                raise SystemExit(f"unknown bench flag {part!r}; known: {', '.join(BENCH_FLAGS)}")
            flags.add(part)
        elif part.split("=", 1)[0].split(".")[0] in ("lora", "model", "threads", "compile"):
            overrides.append(part)
        else:
            overrides.append(f"stages.0.{part}")
    return overrides, flags


class Levers:
    """The bench-only levers, patched into embedkit's trainer for one run and undone after it."""

    def __init__(self, flags: set[str]):
        self.flags, self.undo = flags, []

    def __enter__(self):
        import embedkit.train.trainer as trainer_module

        if "+fused_adamw" in self.flags:
            build = trainer_module.build_optimizer

            def fused(spec, params):
                return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                         weight_decay=spec.weight_decay, fused=True)
            trainer_module.build_optimizer = fused
            self.undo.append(lambda: setattr(trainer_module, "build_optimizer", build))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()


class TokenRecorder:
    """Real tokens of each training step, from the objective's own count (``Loss.tokens``), and the positions the
    step's packed forwards computed (``computed``: a shared prefix counts once per row; None where nothing packed)."""

    def __init__(self, objective: str):
        from embedkit.train.objectives import OBJECTIVES as REGISTRY

        self.cls, self.tokens, self.computed = REGISTRY[objective], [], []

    def __enter__(self):
        import embedkit.packing as packing

        loss, pack = self.original = self.cls.loss, packing.pack
        positions = []

        def counted_pack(ids, prefix_lengths, **options):
            batch, shared = pack(ids, prefix_lengths, **options), options.get("shared_prefix", 0)
            rows = batch.input_ids.shape[0]  # the shared prefix is computed once per row instead of once per text
            positions.append(sum(len(seq) for seq in ids) - shared * (len(ids) - rows))
            return batch

        def recorded(objective, rows, step):
            positions.clear()
            result = loss(objective, rows, step)
            self.tokens.append(result.tokens)
            self.computed.append(sum(positions) if positions else None)
            return result
        self.cls.loss, packing.pack = recorded, counted_pack
        return self

    def __exit__(self, *exc):
        import embedkit.packing as packing

        self.cls.loss, packing.pack = self.original


def bench_embedkit(args, rows: list[dict], folder: Path, variant: str) -> dict:
    from embedkit.train import run_recipe
    from embedkit.train.recipe import load_recipe

    setting = OBJECTIVES[args.objective]
    data = folder / ("rows.jsonl" if args.objective == "supervised" else "texts.txt")
    data.write_text("\n".join(json.dumps(r) if args.objective == "supervised" else r["text"] for r in rows) + "\n")
    stage = {"objective": args.objective, "data": {"paths": [str(data)]}, "steps": args.steps + args.warmup,
             "batch_size": args.batch or setting["batch"], "max_length": args.max_length or setting["max_length"],
             "optimizer": {"lr": setting["lr"]}}
    stage.update({"temperature": 0.05, "hard_negatives": 1} if args.objective == "supervised"
                 else {"attention_dropout": 0.0})
    out = folder / f"embedkit-{time.monotonic_ns()}"
    recipe = {
        "model": {"base": args.model, "dtype": args.dtype, "attention": setting["attention"],
                  "pooling": setting["pooling"], "template": setting["template"], "max_length": 128,
                  "attn_implementation": "eager"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "dtype": args.lora_dtype},
        "output_dir": str(out), "checkpoint": {"every": 0},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        "stages": [stage],
    }
    overrides, flags = parse_variant(variant)
    parsed = load_recipe(recipe, overrides)
    with Levers(flags), TokenRecorder(args.objective) as recorder:
        run_recipe(parsed)
    lines = (out / "metrics.csv").read_text().splitlines()[1:]
    rates = [float(line.split(",")[5]) for line in lines if line.split(",")[5]]
    tokens = recorder.tokens[args.warmup:]
    seconds = sum(t / r for t, r in zip(tokens, rates[args.warmup:], strict=True))
    texts = len(tokens) * parsed.stages[0].batch_size * (3 if args.objective == "supervised" else 2)
    layers = parsed.lora.layers
    computed = recorder.computed[args.warmup:]
    return {"system": f"embedkit {variant or '(recipe settings)'}", "tokens_per_s": sum(tokens) / seconds,
            "avg_tokens": sum(tokens) / texts, "adapted": None if layers == "all" else layers,
            "batch": parsed.stages[0].batch_size, "step_s": seconds / len(tokens), "steps": len(tokens),
            "computed_per_token": sum(computed) / sum(tokens) if all(c is not None for c in computed) else None}


def bench_sentence_transformers(args, rows: list[dict], folder: Path, layers: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.models import Pooling
    from transformers import TrainerCallback

    from embedkit.backbone import convert_gguf, resolve_spec

    setting = OBJECTIVES[args.objective]
    batch, max_length = args.batch or setting["batch"], args.max_length or setting["max_length"]
    resolved = resolve_spec(args.model)
    path = str(convert_gguf(resolved)) if resolved.gguf_file else resolved.path
    st = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": getattr(torch, args.dtype)})
    if setting["pooling"] == "last":
        st = SentenceTransformer(modules=[st[0], Pooling(st.get_sentence_embedding_dimension(), "lasttoken")],
                                 device="cpu")
    st.max_seq_length = max_length
    # sentence-transformers 6 renders texts through the tokenizer's chat template when it has one (SmolLM2's adds a
    # system prompt of ~30 tokens to every text); pin the plain text modality so both systems see the same tokens
    st[0].modality_config.pop("message", None)
    if st.tokenizer.pad_token is None:
        st.tokenizer.pad_token = st.tokenizer.eos_token
    total = st[0].auto_model.config.num_hidden_layers
    count = total if layers == "all" else int(layers.split()[-1])
    # peft's own injection, as sentence-transformers' add_adapter does through transformers (whose add_adapter in
    # transformers 5.24 asks for peft >= 0.22, newer than PyPI's 0.21.2 here)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                       layers_to_transform=list(range(total - count, total)), layers_pattern="layers"),
                            st[0].auto_model)
    template = setting["template"] or "{text}"
    columns = ["anchor", "positive", "negative"] if args.objective == "supervised" else ["text", "text"]
    names = ["anchor", "positive", "negative"][:len(columns)]
    dataset = Dataset.from_dict({name: [template.replace("{text}", r[col]) for r in rows]
                                 for name, col in zip(names, columns, strict=True)})
    marks, tokens = [], []

    class CountingLoss(MultipleNegativesRankingLoss):
        def forward(self, sentence_features, labels):
            features = list(sentence_features)
            tokens.append(sum(int(f["attention_mask"].sum()) for f in features))
            return super().forward(features, labels)

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            marks.append(time.perf_counter())

    targs = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "st-run"), per_device_train_batch_size=batch, max_steps=args.steps + args.warmup,
        learning_rate=setting["lr"], logging_steps=1000, save_strategy="no", report_to=[], dataloader_drop_last=True,
        use_cpu=True, seed=42)
    trainer = SentenceTransformerTrainer(model=st, args=targs, train_dataset=dataset, loss=CountingLoss(st),
                                         callbacks=[Clock()])
    trainer.train()
    seconds = marks[-1] - marks[args.warmup - 1]
    timed = tokens[args.warmup:]
    return {"system": f"sentence-transformers (MNRL, LoRA {layers})", "tokens_per_s": sum(timed) / seconds,
            "avg_tokens": sum(timed) / (len(timed) * batch * len(names)),
            "adapted": None if layers == "all" else count, "batch": batch, "step_s": seconds / len(timed),
            "steps": len(timed)}


def measured(run, config, dtype: torch.dtype) -> dict:
    """One system's result with the matmul peak measured right before and after it."""
    before = matmul_peak(config, dtype)
    result = run()
    result["peak_gflops"] = (before + matmul_peak(config, dtype)) / 2
    adapted = result["adapted"] or config.num_hidden_layers
    result["gflop_per_token"] = train_flops_per_token(config, result["avg_tokens"], adapted, 16) / 1e9
    result["mfu"] = result["tokens_per_s"] * result["gflop_per_token"] / result["peak_gflops"]
    return result


def run_systems(args, config, dtype: torch.dtype, rows: list[dict]) -> dict[str, list[dict]]:
    """Every system once per round, in the order given (the host's speed drifts: rounds show by how much)."""
    systems = {}
    for variant in args.embedkit or [""]:
        systems[f"embedkit {variant or '(recipe settings)'}"] = (bench_embedkit, variant)
    for layers in args.st or ["all"]:
        systems[f"sentence-transformers (MNRL, LoRA {layers})"] = (bench_sentence_transformers, layers)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (bench, option) in systems.items():
                runs[name].append(measured(lambda b=bench, o=option: b(args, rows, Path(tmp), o), config, dtype))
    return runs


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """Per system: the median over rounds of tokens/s and MFU (each round's MFU against its own peak), and the
    ratio to sentence-transformers with LoRA on all layers."""
    results = []
    for name, rounds in runs.items():
        result = dict(rounds[0], system=name)
        for key in ("tokens_per_s", "mfu", "peak_gflops", "step_s", "avg_tokens"):
            result[key] = statistics.median(r[key] for r in rounds)
        result["rounds_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in rounds]
        results.append(result)
    reference = next((r for r in results if r["system"].endswith("LoRA all)")), None)
    for r in results:
        r["over_st_all"] = r["tokens_per_s"] / reference["tokens_per_s"] if reference else None
        r.setdefault("computed_per_token", None)
        for key in ("tokens_per_s", "avg_tokens", "step_s", "peak_gflops", "gflop_per_token", "mfu", "over_st_all",
                    "computed_per_token"):
            if r[key] is not None:
                r[key] = round(r[key], 4 if key in ("mfu", "gflop_per_token", "computed_per_token") else 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="supervised")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (more for +compile)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every system, in turn (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="default: the recipe's (supervised 32, simcse 16)")
    parser.add_argument("--max-length", type=int, default=None, help="default: the recipe's (40, 48)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU runs it natively), float32, bfloat16")
    parser.add_argument("--lora-dtype", choices=["float32", "mixed", "model"], default="model",
                        help="embedkit's adapter dtype (the supervised recipe's: model, as sentence-transformers')")
    parser.add_argument("--embedkit", action="append", default=None, metavar="VARIANT",
                        help="an embedkit run: ';'-separated overrides and bench flags (repeat for several)")
    parser.add_argument("--st", action="append", default=None, metavar="LAYERS",
                        help="a sentence-transformers run with LoRA on 'all' or 'top N' layers (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    args.dtype = str(dtype).removeprefix("torch.")
    from transformers import AutoConfig

    from embedkit.backbone import convert_gguf, resolve_spec

    resolved = resolve_spec(args.model)
    config = AutoConfig.from_pretrained(str(convert_gguf(resolved)) if resolved.gguf_file else resolved.path)
    batch = args.batch or OBJECTIVES[args.objective]["batch"]
    rows = read_rows(args.objective, 2 * batch * (args.steps + args.warmup))  # room for a variant with batch_size x2
    results = summarise(run_systems(args, config, dtype, rows))
    record = {"objective": args.objective, "model": args.model, "max_length": args.max_length, "dtype": args.dtype,
              "lora_dtype": args.lora_dtype, "steps": args.steps, "rounds": args.rounds,
              "machine": describe_cpu(), "threads": torch.get_num_threads(),
              "results": results, "time": time.strftime("%Y-%m-%d %H:%M")}
    print(f"{'system':<48} {'tokens/s':>9} {'MFU':>6} {'peak GF/s':>9} {'x ST':>6} {'computed':>8}")
    for r in results:
        computed = f"{r['computed_per_token']:.3f}" if r["computed_per_token"] is not None else "-"
        print(f"{r['system']:<48} {r['tokens_per_s']:>9.1f} {100 * r['mfu']:>5.1f}% {r['peak_gflops']:>9.0f} "
              f"{r['over_st_all'] or 0:>6.2f} {computed:>8}")
    with (Path(__file__).parent / "results_train.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
