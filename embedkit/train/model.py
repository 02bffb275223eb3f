"""The model a run trains: the backbone (with its LM head when an objective needs one), the embedder around
it, and the LoRA stacking: each stage wraps a fresh adapter and merges it in place when it ends."""

from __future__ import annotations

import torch

from embedkit.backbone import resolve_dtype
from embedkit.embedder import Embedder
from embedkit.train.config import LoraSpec, ModelSpec
from embedkit.train.lora import load_model, plain_weights, quantization_config, wrap_lora


class TrainModel:
    """Backbone, tokenizer, optional causal LM (sharing the backbone's weights) and the embedder."""

    def __init__(self, spec: ModelSpec, lora: LoraSpec, needs_lm_head: bool, init_seed: int):
        dtype = resolve_dtype(spec.dtype)
        quant = quantization_config(lora, dtype)
        model, tokenizer = load_model(spec.base, dtype=dtype, with_lm_head=needs_lm_head, quantization=quant,
                                      attn_implementation=spec.attn_implementation,
                                      trust_remote_code=spec.trust_remote_code)
        self.causal_lm = model if needs_lm_head else None
        base = model.get_decoder() if needs_lm_head else model
        if quant is not None:
            from peft import prepare_model_for_kbit_training  # noqa: PLC0415  (QLoRA only)

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
        for param in model.parameters():
            param.requires_grad_(False)
        if spec.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.spec, self.base, self.tokenizer = spec, base, tokenizer
        torch.manual_seed(init_seed)  # a latent-attention pooler's init, the same on resume
        self.embedder = Embedder.from_pretrained(
            spec.base, attention=spec.attention, pooling=spec.pooling, dtype=spec.dtype, max_length=spec.max_length,
            template=spec.template, query_instruction=spec.query_instruction,
            document_instruction=spec.document_instruction, latent_attention=spec.latent_attention, backbone=base,
            tokenizer=tokenizer)

    def wrap(self, lora: LoraSpec):
        """A fresh LoRA adapter on the current (merged) backbone; ``adapter_config.json`` names the recipe's
        base model (stack.json lists the earlier adapters to merge into it first)."""
        peft_model = wrap_lora(self.base, lora, self.spec.base)
        self.embedder.backbone = peft_model
        return peft_model

    def merge(self, peft_model) -> None:
        """Fold the adapter into the weights in place (the LM head model shares the same modules)."""
        self.base = peft_model.merge_and_unload()
        self.embedder.backbone = self.base

    def finalize(self) -> None:
        """The model to save: plain weights after QLoRA, so loading the embedder needs no bitsandbytes."""
        self.embedder.set_attention(self.spec.attention)
        self.base = plain_weights(self.base, self.spec.dtype)
        self.embedder.backbone = self.base
