"""SimCSE training speed with LoRA: embedkit's trainer vs sentence-transformers' own trainer
(MultipleNegativesRankingLoss on (sentence, sentence) pairs), same model, batch, data and LoRA, in one run.

    .venv/bin/python bench/bench_train.py [--model smollm2-135m] [--steps 6] [--batch 16] [--threads N]

Tokens/s counts real (non-padding) tokens of both views, over the training steps only (model loading and
the first, warm-up step excluded). The machine is shared: compare the two lines of one run, as a ratio.
Results are appended to bench/results_train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from embedkit.backbone import resolve_dtype
from embedkit.hardware import describe_cpu


def sentences(n: int) -> list[str]:
    from embedkit.datasets import find_data_dir

    path = find_data_dir() / "unlabeled" / "WikiText2" / "sentences.txt"
    return path.read_text().splitlines()[:n]


def bench_embedkit(model: str, texts: list[str], steps: int, batch: int, max_length: int, folder: Path,
                   lora_dtype: str, lora_dropout: float, attn: str, dtype: str) -> dict:
    from embedkit.train import run_recipe

    data = folder / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    recipe = {
        "model": {"base": model, "dtype": dtype, "attention": "causal", "pooling": "mean",
                  "max_length": max_length, "attn_implementation": attn},
        "lora": {"r": 16, "alpha": 32, "dropout": lora_dropout, "dtype": lora_dtype},
        "output_dir": str(folder / "embedkit-run"),
        "checkpoint": {"every": 0},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
        "stages": [{"objective": "simcse", "data": {"paths": [str(data)]}, "steps": steps + 1, "batch_size": batch,
                    "attention_dropout": 0.0, "optimizer": {"lr": 3e-5}}],
    }
    run_recipe(recipe)
    rows = (folder / "embedkit-run" / "metrics.csv").read_text().splitlines()[2:]  # skip header + warm-up step
    rates = [float(r.split(",")[5]) for r in rows]
    # per-step rates; their harmonic mean ~ total tokens / total time (steps carry similar token counts)
    rate = len(rates) / sum(1 / r for r in rates)
    return {"system": f"embedkit (LoRA {lora_dtype}, {attn})", "tokens_per_s": round(rate, 1), "steps": steps}


def bench_sentence_transformers(model: str, texts: list[str], steps: int, batch: int, max_length: int,
                                folder: Path, lora_dropout: float, dtype: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from embedkit.backbone import convert_gguf, resolve_spec

    resolved = resolve_spec(model)
    path = str(convert_gguf(resolved)) if resolved.gguf_file else resolved.path
    st = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
    st.max_seq_length = max_length
    if st.tokenizer.pad_token is None:
        st.tokenizer.pad_token = st.tokenizer.eos_token
    # peft's own injection, as sentence-transformers' add_adapter does through transformers (whose add_adapter in
    # transformers 5.24 asks for peft >= 0.22, newer than PyPI's 0.21.2 here)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"]), st[0].auto_model)
    used = texts[: batch * (steps + 1)]
    dataset = Dataset.from_dict({"anchor": used, "positive": used})
    lengths = [len(ids) for ids in st.tokenizer(used, truncation=True, max_length=max_length)["input_ids"]]

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    clock = Clock()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "st-run"), per_device_train_batch_size=batch, max_steps=steps + 1,
        learning_rate=3e-5, logging_steps=1000, save_strategy="no", report_to=[], dataloader_drop_last=True,
        use_cpu=True, seed=42)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(st), callbacks=[clock])
    trainer.train()
    elapsed = clock.marks[-1] - clock.marks[0]
    tokens = 2 * sum(lengths[batch:batch * (steps + 1)])  # both columns, steps after the warm-up one
    return {"system": "sentence-transformers (MNRL)", "tokens_per_s": round(tokens / elapsed, 1), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU runs it natively), float32, bfloat16")
    parser.add_argument("--lora-dtype", choices=["float32", "mixed", "model"], default="mixed",
                        help="embedkit's adapter dtype (sentence-transformers' add_adapter keeps the model's)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout, both systems")
    parser.add_argument("--attn", default="eager", help="embedkit's attn_implementation (its CPU recipes: eager)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    texts = sentences(args.batch * (args.steps + 1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(bench_embedkit(args.model, texts, args.steps, args.batch, args.max_length, Path(tmp),
                                      args.lora_dtype, args.lora_dropout, args.attn, args.dtype))
        results.append(bench_sentence_transformers(args.model, texts, args.steps, args.batch, args.max_length,
                                                   Path(tmp), args.lora_dropout, args.dtype))
    ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    record = {"model": args.model, "batch": args.batch, "max_length": args.max_length,
              "lora_dropout": args.lora_dropout,
              "dtype": args.dtype, "machine": describe_cpu(),
              "threads": torch.get_num_threads(), "results": results, "embedkit_over_st": round(ratio, 2),
              "time": time.strftime("%Y-%m-%d %H:%M")}
    for r in results:
        print(f"{r['system']:<32} {r['tokens_per_s']:>8.1f} tokens/s")
    print(f"embedkit / sentence-transformers: {ratio:.2f}x")
    with (Path(__file__).parent / "results_train.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
