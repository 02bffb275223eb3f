"""The computations behind the golden outputs (tests/golden/): shared by tests/test_golden.py, which recomputes
and compares, and tests/golden/make_golden.py, which (run on purpose only) writes them.

Everything goes through the public API the other tests use, so a refactoring that keeps behaviour keeps these
numbers; at most the imports below need new paths.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import STORIES, tiny_model

from embedkit import Embedder, Index
from embedkit.corpus import encode_corpus
from embedkit.index import BuildOptions, build_index
from embedkit.methods.gem import enable_gem
from embedkit.methods.soft_mask import soft_mask_bias
from embedkit.methods.token_prepending import build_from_recipe, enable_token_prepending
from embedkit.train import run_recipe

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN = TESTS / "golden"
FIXTURE = TESTS / "fixtures" / "saved-embedder-v0"
SENTENCES = STORIES.parent.parent / "data" / "unlabeled" / "TinyStories" / "sentences.txt"

TEXTS = ["Once upon a time there was a little girl.", "The dog ran to the park.", "Lily liked to play.",
         "One day, a big bird flew over the house and sang a song for everyone to hear.", "Hi",
         "Tom and Sue found a red ball under the old tree, and they were very happy."]
PROMPT_EOL = 'This sentence : "{text}" means in one word:"'
ATTENTIONS = ("causal", "bidirectional")
POOLINGS = ("mean", "weighted_mean", "last", "eos", "first", "latent_attention")
TINY_SEED = 1234  # a private tiny Llama (tiny_model caches per seed; no other test uses this one)

# The shipped CPU recipes: everything in recipes/*.yaml but recipes/paper/ and the 1.5B-8B models.
TRAIN_RECIPES = ("llm2vec-smollm2-cpu", "llm2vec-smollm2-literal-cpu", "llm2vec-smollm2-supervised-cpu",
                 "gem-smollm2-135m", "conan-smollm2-135m-hard", "conan-smollm2-135m-soft",
                 "conan-smollm2-135m-soft-mining", "nvembed-smollm2-135m", "mix-smollm2-135m-cpu",
                 "supervised-gemma3-270m-cpu", "mix-gemma3-270m-cpu", "distill-gemma3-270m-cpu")
# Shipped recipes that are another one at fewer steps (make demo's): covered by that one's golden losses
STEP_VARIANTS = {"distill-gemma3-270m-demo": "distill-gemma3-270m-cpu"}
TP_RECIPE = "tp-smollm2-135m"  # not trained: it builds an embedder, so its golden output is vectors
STEPS = 5
QUERIES = ["a little girl went to the park", "the dog was happy", "a big red ball", "mom baked a cake",
           "they played in the snow"]
N_INDEX_TEXTS = 50


# -- vectors -----------------------------------------------------------------------------------------------

def stories(**kwargs) -> Embedder:
    return Embedder.from_pretrained(STORIES, dtype="float32", **kwargs)


def tiny_llama(**kwargs) -> Embedder:
    model, tokenizer = tiny_model("llama", "eager", seed=TINY_SEED)
    return Embedder.from_pretrained("llama", backbone=model, tokenizer=tokenizer, **kwargs)


def build(make: Callable[..., Embedder], attention: str, pooling: str) -> Embedder:
    torch.manual_seed(0)  # latent attention's pooler is randomly initialised
    return make(attention=attention, pooling=pooling)


def mode_cases(make: Callable[..., Embedder]) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    for attention in ATTENTIONS:
        for pooling in POOLINGS:
            yield f"{attention}-{pooling}", lambda a=attention, p=pooling: build(make, a, p).encode(TEXTS)


def _token_prepending(**settings) -> np.ndarray:
    embedder = stories()
    enable_token_prepending(embedder, **settings)
    return embedder.encode(TEXTS)


def _gem(num_special_tokens: int) -> np.ndarray:
    embedder = stories()
    enable_gem(embedder, num_special_tokens=num_special_tokens)
    return embedder.encode(TEXTS)


def _soft_mask(alpha: float, weight: str) -> np.ndarray:
    embedder = stories(attention="bidirectional")
    embedder.attention_bias = soft_mask_bias(alpha, weight)
    return embedder.encode(TEXTS)


def _tp_recipe() -> np.ndarray:
    """recipes/tp-smollm2-135m.yaml on stories260K (5 layers): its prompt, the layer range moved inside."""
    data = yaml.safe_load((REPO / "recipes" / f"{TP_RECIPE}.yaml").read_text())
    data["model"].update(base=str(STORIES), dtype="float32")
    data["token_prepending"].update(start_layer=1, end_layer=3, output_layer=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tp.yaml"
        path.write_text(yaml.safe_dump(data))
        return build_from_recipe(path).encode(TEXTS)


def extra_cases() -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Stories260K beyond attention x pooling: instructions, PromptEOL, and the embed-time methods."""
    yield "instruction-bidirectional-mean", lambda: stories(attention="bidirectional").encode(
        TEXTS, instruction="Represent the story: ")
    yield "query-instruction-causal-last", lambda: stories(pooling="last", query_instruction="Question: ")\
        .encode_queries(TEXTS)
    yield "prompteol-causal-last", lambda: stories(pooling="last", template=PROMPT_EOL).encode(TEXTS)
    yield "token-prepending-1-3", lambda: _token_prepending(start_layer=1, end_layer=3)
    yield "token-prepending-cot-1-3-out4", lambda: _token_prepending(prompt="cot", start_layer=1, end_layer=3,
                                                                     output_layer=4)
    yield "tp-recipe", _tp_recipe
    yield "gem-1", lambda: _gem(1)
    yield "gem-2", lambda: _gem(2)
    for weight in ("linear", "l_over_i", "i_over_l"):
        yield f"soft-mask-0.5-{weight}", lambda w=weight: _soft_mask(0.5, w)


def vector_groups() -> dict[str, Callable[[], Iterator[tuple[str, Callable[[], np.ndarray]]]]]:
    """Group name (one .npy each) -> its (case name, compute) pairs."""
    return {"stories260K": lambda: mode_cases(stories), "tiny-llama": lambda: mode_cases(tiny_llama),
            "stories260K-extra": extra_cases}


# -- training losses -----------------------------------------------------------------------------------------

def recipe_overrides(name: str, output: Path) -> list[str]:
    """The recipe on stories260K in float32, 5 steps per stage, batch 4, short texts, nothing but the CSV log."""
    stages = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())["stages"]
    out = [f"model.base={STORIES}", "model.dtype=float32", "model.max_length=32", "lora.dtype=float32",
           f"output_dir={output}", "threads=1", "checkpoint.every=0", "logging.every=1",
           "logging.tensorboard=false", "logging.plot=false", "logging.progress_bar=false",
           "evaluate.sts_splits=[]", "evaluate.before=false"]
    for i, stage in enumerate(stages):
        out += [f"stages.{i}.steps={STEPS}", f"stages.{i}.batch_size=4", f"stages.{i}.max_length=32"]
        if isinstance(stage["data"], list):  # a mixture: each source limited
            out += [f"stages.{i}.data.{j}.limit=64" for j in range(len(stage["data"]))]
        elif "negative_settings" not in stage:
            out.append(f"stages.{i}.data.limit=64")
        if "switch_step" in stage:
            out.append(f"stages.{i}.switch_step=2")  # GEM: both the NTP-only and the contrastive phase
        if stage["objective"] == "mntp":
            out.append(f"stages.{i}.mask_token=new")  # stories260K's tokenizer has no mask token nor '_'
        if "negative_settings" in stage:  # 2 batches an epoch: mined negatives are used within 5 steps
            out += [f"stages.{i}.negative_settings.pool_size=4", f"stages.{i}.data.limit=8"]
    return out


def train_losses(name: str) -> list[dict]:
    """[{stage, step, loss}] of a short run of ``recipes/<name>.yaml``, read from its metrics.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run_recipe(REPO / "recipes" / f"{name}.yaml", overrides=recipe_overrides(name, run))
        with (run / "metrics.csv").open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["loss"]]
    return [{"stage": r["stage_name"], "step": int(r["step"]), "loss": float(r["loss"])} for r in rows]


# -- index search ------------------------------------------------------------------------------------------

def index_results(tmp: Path) -> dict[str, dict]:
    """Flat and HNSW indexes of 50 TinyStories sentences: ids and scores of 5 queries, top 5."""
    texts = SENTENCES.read_text(encoding="utf-8").splitlines()[:N_INDEX_TEXTS]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"s{i}", "title": "", "text": t}) + "\n"
                              for i, t in enumerate(texts)), encoding="utf-8")
    embedder = stories(max_length=48)
    encode_corpus(embedder, [corpus], tmp / "vectors", model_spec=STORIES, shard_size=20)
    out = {}
    for kind in ("flat", "hnsw"):
        build_index(tmp / "vectors", tmp / kind, BuildOptions(index_type=kind))
        hits = Index.load(tmp / kind, embedder=embedder).search(QUERIES, k=5)
        out[kind] = {"ids": [[h.id for h in row] for row in hits], "scores": [[h.score for h in row] for row in hits]}
    return out


# -- the old saved folder ---------------------------------------------------------------------------------

def fixture_embedder() -> Embedder:
    return stories(attention="bidirectional", pooling="mean", query_instruction="q: ")


def fixture_vectors(embedder: Embedder) -> np.ndarray:
    """Documents then queries (the saved query instruction applies to the second half)."""
    return np.concatenate([embedder.encode(TEXTS), embedder.encode_queries(TEXTS)])
