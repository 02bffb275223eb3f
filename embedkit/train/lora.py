"""LoRA / QLoRA on the backbone through peft, with per-architecture target modules.

``target_modules: auto`` picks the attention and MLP projections of the architecture (Llama-style
q/k/v/o + gate/up/down, Phi3's fused qkv_proj / gate_up_proj, GPT-2's c_attn / c_proj / c_fc). An explicit
list is checked: a name that matches no linear layer fails, listing the layers the model has.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.distributed.tensor  # noqa: F401  (peft 0.21 + torch 2.13 need it imported before peft)
from torch import nn

from embedkit.backbone import convert_gguf, decoder_layers, load_backbone, load_tokenizer, resolve_dtype, resolve_spec

LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KNOWN_TARGETS: dict[str, list[str]] = {
    **{name: LLAMA_STYLE for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                      "gemma3", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
FAN_IN_FAN_OUT = {"gpt2"}  # Conv1D weights are stored transposed


class LoraTargetError(ValueError):
    """LoRA target modules that match nothing in the model."""


def linear_leaf_names(model: nn.Module) -> set[str]:
    """Last name component of every linear-like module (nn.Linear, GPT-2 Conv1D, bitsandbytes linears)."""
    names = set()
    for full, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in ("lm_head", "score"):
                names.add(leaf)
    return names


def resolve_targets(model: nn.Module, requested: str | list[str]) -> list[str]:
    """Target module names for peft: the architecture's known set for ``auto``, else the checked list."""
    present = linear_leaf_names(model)
    model_type = getattr(model.config, "model_type", "?")
    arch = type(model).__name__
    if requested == "auto":
        known = KNOWN_TARGETS.get(model_type)
        candidates = known if known is not None else sorted({n for names in KNOWN_TARGETS.values() for n in names})
        targets = [name for name in candidates if name in present]
        if not targets:
            raise LoraTargetError(
                f"No LoRA target modules found for {arch} (model_type={model_type!r}): none of {candidates} is a "
                f"linear layer of this model. Its linear layers are: {sorted(present)}. Set lora.target_modules "
                "to a list of them.")
        return targets
    missing = [name for name in requested if name not in present]
    if missing:
        raise LoraTargetError(
            f"lora.target_modules {missing} match no linear layer of {arch} (model_type={model_type!r}). Its "
            f"linear layers are: {sorted(present)}; or use target_modules: auto.")
    return list(requested)


def wrap_lora(model: nn.Module, spec, base_name: str, adapter_name: str = "default"):
    """Add a fresh LoRA adapter (float32 parameters on a bf16/fp32 model) and freeze everything else.

    ``base_name`` is written to ``adapter_config.json`` as the base model: set deliberately (the recipe's
    spec for the first stage, the previous stage's merged model after that).
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    targets = resolve_targets(model, spec.target_modules)
    model_type = getattr(model.config, "model_type", "")
    layers = getattr(spec, "layers", "all")
    indices, pattern = (None, None) if layers == "all" else top_layers(model, layers)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none",
        fan_in_fan_out=model_type in FAN_IN_FAN_OUT, layers_to_transform=indices, layers_pattern=pattern,
    )
    dtype = getattr(spec, "dtype", "float32")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name,
                                autocast_adapter_dtype=dtype in ("float32", "mixed"))
    peft_model.peft_config[adapter_name].base_model_name_or_path = str(base_name)
    if dtype == "mixed":
        compute_in_model_dtype(peft_model)
    drop_input_grad_hooks(model)
    return peft_model


def top_layers(model: nn.Module, count: int) -> tuple[list[int], str]:
    """Indices of the top ``count`` decoder layers and the name of their ``nn.ModuleList`` (peft's
    ``layers_to_transform`` / ``layers_pattern``)."""
    try:
        layers = decoder_layers(model)
    except ValueError as err:
        raise LoraTargetError(f"lora.layers={count}: {err} Use lora.layers: all.") from None
    total = len(layers)
    if count > total:
        raise LoraTargetError(f"lora.layers=top {count} but {type(model).__name__} has {total} decoder layers; use 1 "
                              f"to {total}, or all.")
    name = next(n for n, module in model.named_modules() if module is layers)
    return list(range(total - count, total)), name.rsplit(".", 1)[-1]


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove the hooks that make the input embeddings' output require grad (transformers adds one with gradient
    checkpointing, peft another when wrapping a checkpointed model): they only serve reentrant checkpointing,
    which embedkit does not use, and they make autograd record every layer from the bottom, so a top-layers-only
    adapter's backward would still run through the whole stack."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    hooks = getattr(embeddings, "_forward_hooks", {})
    for key, hook in list(hooks.items()):
        if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
            del hooks[key]


def compute_in_model_dtype(peft_model: nn.Module) -> None:
    """Mixed precision for float32 adapters on a bf16/fp16 model: the adapters' matmuls run in the model's
    dtype under autocast, the float32 parameters take the updates.

    peft otherwise casts every adapted layer's input up to float32 (a copy of each activation, and float32
    matmuls); here inputs stay in the model's dtype. Losses are computed outside the model, in float32.
    """
    frozen = [p for p in peft_model.parameters() if not p.requires_grad and p.is_floating_point()]
    dtype = frozen[0].dtype if frozen else torch.float32
    if dtype == torch.float32:
        return
    for module in peft_model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    device_type = frozen[0].device.type
    peft_model.forward = torch.autocast(device_type, dtype=dtype)(peft_model.forward)


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("QLoRA (lora.quantization: 4bit/8bit) and optimizer adamw_8bit need bitsandbytes: "
                          "pip install 'embedkit[qlora]' (or pip install bitsandbytes), or set "
                          "lora.quantization: none.")


def quantization_config(spec, compute_dtype: torch.dtype):
    """The transformers BitsAndBytesConfig for ``lora.quantization`` (None for 'none')."""
    if spec.quantization == "none":
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)


def plain_weights(model: nn.Module, dtype: str) -> nn.Module:
    """A QLoRA model (adapters merged into 4/8-bit weights) dequantised to ``dtype``; others as they are."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    return model.dequantize(dtype=resolve_dtype(dtype))


def load_model(spec: str | os.PathLike, *, dtype, with_lm_head: bool, quantization=None,
               attn_implementation: str | None = None, trust_remote_code: bool = False):
    """Like ``embedkit.backbone.load_backbone`` but can pass a bitsandbytes quantization config."""
    if quantization is None:
        return load_backbone(spec, dtype=dtype, with_lm_head=with_lm_head, attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: PLC0415

    resolved = resolve_spec(spec)
    path = str(convert_gguf(resolved)) if resolved.gguf_file else resolved.path
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = AutoModelForCausalLM if with_lm_head else AutoModel
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_pretrained(path, config=config, dtype=resolve_dtype(dtype), use_safetensors=True,
                                quantization_config=quantization, device_map="cpu",
                                trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code)
