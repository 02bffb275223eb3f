"""Token Prepending on SmolLM2-135M: layer-range sweep on STS-B dev, then the chosen setting on STS-B test
beside plain PromptEOL, with the encode time of both measured side by side (alternating runs, best of N).

    .venv/bin/python bench/token_prepending.py sweep   # dev only: layer range, then output layer, then init
    .venv/bin/python bench/token_prepending.py test --start-layer 8 --end-layer 10 --output-layer 27
    .venv/bin/python bench/token_prepending.py timing --start-layer 8 --end-layer 10 --output-layer 27 --repeats 5

Results are appended to bench/results/token_prepending.jsonl (one JSON object per measured setting).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from embedkit import Embedder
from embedkit.backbone import load_backbone
from embedkit.datasets import find_data_dir, read_sts
from embedkit.evaluation.sts import sts_spearman
from embedkit.methods import token_prepending as tp

RESULTS = Path(__file__).resolve().parent / "results" / "token_prepending.jsonl"
MAX_LENGTH = 128


def record(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def embedders(model: str, dtype: str):
    backbone, tokenizer = load_backbone(model, dtype=dtype)
    plain = Embedder.from_pretrained(model, pooling="last", template=tp.PROMPTS["prompteol"].replace("<PST> ", ""),
                                     max_length=MAX_LENGTH, backbone=backbone, tokenizer=tokenizer)
    with_tp = Embedder.from_pretrained(model, pooling="last", max_length=MAX_LENGTH, backbone=backbone,
                                       tokenizer=tokenizer)
    return plain, with_tp


def configure(embedder, prompt: str, **settings) -> None:
    tp.enable_token_prepending(embedder, prompt, **settings)


def sweep(args) -> None:
    """Layer ranges (START:END), then output layers at the best range, then the placeholder init: dev only.
    Settings already measured (in the results file) are not run again."""
    plain, with_tp = embedders(args.model, args.dtype)
    data = find_data_dir(args.data)
    done = {}
    if RESULTS.is_file():
        for line in RESULTS.read_text().splitlines():
            row = json.loads(line)
            if row.get("split") == "dev":
                key = (row["method"], row.get("start_layer"), row.get("end_layer"), row.get("output_layer"),
                       row.get("placeholder_init", "random"), row.get("prompt", "prompteol"))
                done[key] = row["spearman"]

    def measure(embedder, method, start=None, end=None, out=None, init="random"):
        key = (method, start, end, out, init, args.prompt)
        if key not in done:
            if method == "TP":
                configure(embedder, args.prompt, start_layer=start, end_layer=end, output_layer=out,
                          placeholder_init=init)
            row = {"split": "dev", "method": method, "spearman": sts_spearman(embedder, data, "dev")}
            if method == "TP":
                row.update(prompt=args.prompt, start_layer=start, end_layer=end, output_layer=out,
                           placeholder_init=init)
            record(row)
            done[key] = row["spearman"]
        return done[key]

    measure(plain, "PromptEOL")
    ranges = [tuple(int(x) for x in r.split(":")) for r in args.ranges]
    best = max(ranges, key=lambda r: measure(with_tp, "TP", r[0], r[1]))
    best_out = max([None] + args.output_layers, key=lambda o: measure(with_tp, "TP", best[0], best[1], o))
    measure(with_tp, "TP", best[0], best[1], best_out, "mean")
    print(f"best on dev: layers {best[0]}:{best[1]} output_layer={best_out}", flush=True)


def test(args) -> None:
    """STS-B test of PromptEOL, PromptEOL with the same early exit (control, no placeholder overwriting) and TP;
    encode time of each measured side by side (alternating passes; Spearman from the last pass's vectors)."""
    from embedkit.evaluation.sts import cosine_spearman  # noqa: PLC0415

    plain, with_tp = embedders(args.model, args.dtype)
    data = find_data_dir(args.data)
    s1, s2, gold = read_sts(data, "test")
    sentences = list(dict.fromkeys(s1 + s2))
    index = {t: i for i, t in enumerate(sentences)}
    tp_settings = {"start_layer": args.start_layer, "end_layer": args.end_layer, "output_layer": args.output_layer}
    setups = [("PromptEOL", plain, None)]
    if args.output_layer is not None:  # early exit alone: a range past the exit overwrites nothing
        n = args.output_layer
        control = {"start_layer": n, "end_layer": n + 1, "output_layer": n}
        setups.append(("<PST> prompt + exit, no overwrite", with_tp, control))
    setups.append(("TP", with_tp, tp_settings))
    times = {name: [] for name, _, _ in setups}
    vectors = {}
    for _ in range(args.repeats):  # alternate so every setup sees the same machine load
        for name, embedder, settings in setups:
            if settings is not None:
                configure(embedder, args.prompt, **settings)
            start = time.perf_counter()
            vectors[name] = embedder.encode(sentences)
            times[name].append(time.perf_counter() - start)
    for name, _, settings in setups:
        v = vectors[name]
        score = cosine_spearman(v[[index[t] for t in s1]], v[[index[t] for t in s2]], gold)
        record({"split": "test", "method": name, "prompt": args.prompt, **(settings or {}), "spearman": score,
                "encode_s_best": min(times[name]), "encode_s_all": times[name], "sentences": len(sentences),
                "time_ratio_vs_PromptEOL": min(times[name]) / min(times["PromptEOL"]), "threads": args.threads})


def timing(args) -> None:
    """Encode time only: PromptEOL vs TP on the first ``--n`` unique STS-B test sentences, alternating passes."""
    plain, with_tp = embedders(args.model, args.dtype)
    configure(with_tp, args.prompt, start_layer=args.start_layer, end_layer=args.end_layer,
              output_layer=args.output_layer)
    s1, s2, _ = read_sts(find_data_dir(args.data), "test")
    sentences = list(dict.fromkeys(s1 + s2))[: args.n]
    times = {"PromptEOL": [], "TP": []}
    for _ in range(args.repeats):
        for name, embedder in (("PromptEOL", plain), ("TP", with_tp)):
            start = time.perf_counter()
            embedder.encode(sentences)
            times[name].append(time.perf_counter() - start)
    record({"split": "test", "measure": "time", "sentences": len(sentences), "threads": args.threads,
            "start_layer": args.start_layer, "end_layer": args.end_layer, "output_layer": args.output_layer,
            "PromptEOL_s": times["PromptEOL"], "TP_s": times["TP"],
            "ratio_best": min(times["TP"]) / min(times["PromptEOL"]),
            "ratio_median": sorted(times["TP"])[len(times["TP"]) // 2] / sorted(
                times["PromptEOL"])[len(times["PromptEOL"]) // 2]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["sweep", "test", "timing"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data", default=None)
    parser.add_argument("--prompt", default="prompteol", choices=sorted(tp.PROMPTS))
    parser.add_argument("--ranges", nargs="+", default=["1:2", "1:3", "1:4", "1:8", "0:1", "4:6", "8:10",
                                                         "12:14", "16:18"])
    parser.add_argument("--output-layers", type=int, nargs="+", default=[16, 20, 24, 27])
    parser.add_argument("--start-layer", type=int, default=1)
    parser.add_argument("--end-layer", type=int, default=8)
    parser.add_argument("--output-layer", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000, help="timing: sentences to encode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"sweep": sweep, "test": test, "timing": timing}[args.phase](args)


if __name__ == "__main__":
    main()
