"""Embedder: backbone -> attention mode -> pooling -> (normalise), with fast encode and a saved form that
``SentenceTransformer(path)`` loads.

The saved folder is a Hugging Face model folder (``config.json`` carries ``is_causal``), plus
sentence-transformers' ``modules.json`` / ``1_Pooling`` / ``2_Normalize``, plus ``embedkit.json`` (this
``EmbedderConfig``). ``st_export`` writes the sentence-transformers side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from embedkit import attention as attn
from embedkit import st_export
from embedkit.backbone import load_backbone, load_tokenizer, merged_copy, padding_id, resolve_dtype
from embedkit.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_TOKENS,
    Tokenized,
    collate,
    plan_for_workers,
    run_batches,
    tokenize,
)
from embedkit.compilation import compile_decoder_layers
from embedkit.embedder_config import CONFIG_FILE, EmbedderConfig
from embedkit.io import atomic_write_dir
from embedkit.method_registry import apply_methods
from embedkit.packing import packed_vectors, packing_blocker, plan_packed_batches
from embedkit.pooling import Pooler, pooler_class, shared_pooler

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_TEXTS = 2000

# Hidden-state hook: (embedder, input_ids, attention_mask) -> hidden states (B, L, H). Methods such as
# Token Prepending install one to change how the backbone is run; the default runs it plainly.
ForwardHook = Callable[["Embedder", torch.Tensor, torch.Tensor], torch.Tensor]


class Embedder(nn.Module):
    """A decoder LLM used as a text encoder. Build with ``from_pretrained``, reload with ``load``."""

    def __init__(self, backbone: nn.Module, tokenizer, config: EmbedderConfig, pooler: Pooler | None = None):
        """``pooler``: the trainable pooler of a pooling that has weights; parameter-free poolings need none."""
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.pooler = pooler
        self.attention_bias: attn.AttentionBias | None = None
        self.forward_hook: ForwardHook | None = None
        attn.set_mode(backbone, config.attention)
        pooling = pooler_class(config.pooling)
        if pooling.trainable and pooler is None:
            raise ValueError(f"pooling={config.pooling!r} needs its trained {pooling.__name__} module.")

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike,
        *,
        attention: str = "causal",
        pooling: str = "mean",
        dtype: str | torch.dtype = "auto",
        max_length: int = 512,
        normalize: bool = True,
        device: str = "cpu",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        template: str | None = None,
        latent_attention: dict | None = None,
        backbone: nn.Module | None = None,
        tokenizer=None,
    ) -> Embedder:
        """Load a backbone from any spec (hub id, folder, .gguf, alias) and wrap it as an embedder.

        Pass ``backbone`` and ``tokenizer`` to wrap an already-loaded model (e.g. peft-wrapped) instead.
        ``latent_attention``: the settings of a trainable pooler (built new: only training should ask for one).
        """
        dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        config = EmbedderConfig(
            backbone=str(spec), attention=attention, pooling=pooling, max_length=max_length,
            normalize=normalize, dtype=dtype_name, query_instruction=query_instruction,
            document_instruction=document_instruction, template=template,
        )
        if backbone is None:
            backbone, tokenizer = load_backbone(
                spec, dtype=dtype, device=device, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        pooler = None
        if pooler_class(pooling).trainable:  # a new, untrained pooler: the trainer trains it
            pooler = pooler_class(pooling).build(backbone.config.hidden_size, latent_attention).to(device)
            config.latent_attention = pooler.settings()
        return cls(backbone, tokenizer, config, pooler)

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def active_pooler(self) -> Pooler:
        """The pooler ``forward`` uses: the embedder's trained one, else the shared one of ``config.pooling``."""
        return self.pooler if self.pooler is not None else shared_pooler(self.config.pooling)

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    def compile_layers(self) -> Embedder:
        """Compile the decoder layers with ``torch.compile`` (fused element-wise kernels: faster long encodes
        on CPU; the first batches pay the compile). Weights, state dict and fingerprint are unchanged; sdpa
        attention becomes eager attention, which compiles (``use_eager_attention``)."""
        if self.forward_hook is not None:
            raise ValueError("compile_layers() does not apply under a forward hook (e.g. Token Prepending, GEM): "
                             "the hook's per-call module hooks would recompile every batch. Encode uncompiled.")
        self.use_eager_attention()
        compile_decoder_layers(self.backbone)
        return self

    def use_eager_attention(self) -> bool:
        """Run sdpa attention as eager matmul + softmax (``attention.use_eager_attention`` says when that is
        faster), re-probing the attention mode under it; True if it switched."""
        if not attn.use_eager_attention(self.backbone):
            return False
        self.set_attention(self.config.attention)
        return True

    def set_attention(self, mode: str) -> None:
        """Switch causal <-> bidirectional on the loaded model (verified by a probe)."""
        attn.set_mode(self.backbone, mode)
        self.config.attention = mode

    # -- forward -------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, L, H) under the current attention mode, bias and forward hook."""
        if self.forward_hook is not None:
            return self.forward_hook(self, input_ids, attention_mask)
        inputs = attn.model_inputs(self.backbone, input_ids, attention_mask, self.attention_bias)
        return self.backbone(**inputs, use_cache=False).last_hidden_state

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Un-normalised embeddings (B, H) with gradients (training uses this)."""
        pool_mask = attention_mask if pool_mask is None else pool_mask
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.active_pooler.pool(hidden, attention_mask, pool_mask)

    # -- encode --------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], instruction: str | None = None) -> Tokenized:
        """Token ids of ``instruction + template(text)``, each cut to ``config.max_length``."""
        return tokenize(
            self.tokenizer, texts, max_length=self.config.max_length, instruction=instruction,
            template=self.config.template, append_eos=pooler_class(self.config.pooling).appends_eos,
        )

    def _warn_truncated(self, tokenized: Tokenized) -> None:
        if tokenized.n_truncated:
            logger.warning(
                "%d of %d texts were longer than max_length=%d tokens and were truncated.",
                tokenized.n_truncated, len(tokenized), self.config.max_length,
            )

    def collate(self, tokenized: Tokenized, rows: Sequence[int] | None = None, padding_side: str = "right"):
        """Pad some rows of a Tokenized into (input_ids, attention_mask, pool_mask) on this device."""
        rows = range(len(tokenized)) if rows is None else rows
        tensors = collate(
            [tokenized.ids[i] for i in rows], [tokenized.prefix_lengths[i] for i in rows],
            pad_id=padding_id(self.tokenizer, self.backbone), padding_side=padding_side,
        )
        return tuple(t.to(self.device) for t in tensors)

    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int | None = None,
        normalize: bool | None = None,
        show_progress_bar: bool | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        padding_side: str = "right",
        workers: int | None = None,
        dimensions: int | None = None,
        *,
        packed: bool = False,
        max_tokens: int | None = None,
    ) -> np.ndarray:
        """Encode texts to an (n, d) float32 array, in input order.

        Tokenizes once (each text cut to ``config.max_length`` tokens), sorts by length and batches by a
        padded-token budget (``max_batch_tokens``; ``batch_size`` caps texts per batch). ``instruction`` is
        prepended and attended to, but not pooled. ``workers``: batches encoded in parallel, each on one torch
        thread (default: torch's thread count on CPU, 1 on GPU or with a forward hook that is not thread-safe).
        ``dimensions``: keep the first ``dimensions`` components (Matryoshka), then normalise (if normalising).
        ``packed``: packed forwards (see ``encode_tokenized``). ``max_tokens``: deprecated ``max_batch_tokens``.
        """
        if max_tokens is not None:
            warnings.warn("Embedder.encode(max_tokens=) is deprecated and will be removed: use max_batch_tokens= "
                          "(the padded-token budget of a batch).", FutureWarning, stacklevel=3)
            max_batch_tokens = max_tokens
        width = self._check_dimensions(dimensions)
        tokenized = self.tokenize(texts, instruction)
        self._warn_truncated(tokenized)
        return self.encode_tokenized(tokenized, width, batch_size=batch_size, normalize=normalize,
                                     show_progress_bar=show_progress_bar, max_batch_tokens=max_batch_tokens,
                                     padding_side=padding_side, workers=workers, packed=packed)

    def encode_tokenized(
        self, tokenized: Tokenized, width: int | None = None, *, batch_size: int | None = None,
        normalize: bool | None = None, show_progress_bar: bool | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, padding_side: str = "right", workers: int | None = None,
        packed: bool = False,
    ) -> np.ndarray:
        """``encode`` for rows tokenized already (the server merges requests with different instructions):
        sorted token-budget batches on ``workers`` threads, the first ``width`` components, input order.
        ``packed``: batches of ``max_batch_tokens`` real tokens run as packed forwards (embedkit/packing.py),
        or padded when this embedder cannot be packed (``packing_blocker`` says why)."""
        width = self.dimension if width is None else width
        normalize = self.config.normalize if normalize is None else normalize
        out = np.empty((len(tokenized), width), dtype=np.float32)
        if len(tokenized) == 0:
            return out
        workers = self.default_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        lengths = [len(s) for s in tokenized.ids]
        if packed and (reason := packing_blocker(self, max(lengths))) is not None:
            logger.debug("padded forwards, not packed: %s", reason)
            packed = False
        plan = (plan_packed_batches if packed else plan_for_workers)(
            lengths, max_batch_tokens=max_batch_tokens, max_batch=batch_size or DEFAULT_MAX_BATCH, workers=workers)
        if show_progress_bar is None:
            show_progress_bar = len(tokenized) >= PROGRESS_BAR_MIN_TEXTS
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), tqdm(total=len(tokenized), disable=not show_progress_bar, desc="encode",
                                              unit="text") as bar:
                bar_lock = threading.Lock()

                def step(rows: list[int]) -> None:
                    vectors = packed_vectors(self, tokenized, rows) if packed else \
                        self(*self.collate(tokenized, rows, padding_side))
                    vectors = vectors.float()[:, :width]
                    if normalize:
                        vectors = torch.nn.functional.normalize(vectors, dim=-1)
                    out[rows] = vectors.cpu().numpy()
                    with bar_lock:
                        bar.update(len(rows))

                run_batches(plan, step, workers=min(workers, len(plan)))
        finally:
            self.train(was_training)
        return out

    def _check_dimensions(self, dimensions: int | None) -> int:
        """The output width for ``encode(dimensions=)``; warns once per call on dims the model was not trained
        for (when it records its Matryoshka dims)."""
        if dimensions is None:
            return self.dimension
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.dimension:
            raise ValueError(f"dimensions={dimensions!r} is out of range: this model's vectors have {self.dimension} "
                             f"components; give 1 to {self.dimension} (or none for all).")
        trained = self.config.matryoshka_dims
        if trained and dimensions != self.dimension and dimensions not in trained:
            logger.warning("dimensions=%d is not one of the Matryoshka dims this model was trained with %s: "
                           "its truncated vectors may be much worse.", dimensions, trained)
        return dimensions

    def default_workers(self) -> int:
        """Parallel encode batches: one per torch thread on CPU; 1 on GPU or under a stateful forward hook."""
        if self.device.type != "cpu":
            return 1
        if self.forward_hook is not None and not getattr(self.forward_hook, "thread_safe", False):
            return 1
        return torch.get_num_threads()

    def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Encode with the query instruction (if the embedder has one)."""
        return self.encode(texts, instruction=self.config.query_instruction, **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """Encode with the document instruction (if the embedder has one)."""
        return self.encode(texts, instruction=self.config.document_instruction, **kwargs)

    # -- identity ------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the config and every weight: equal fingerprints mean equal vectors."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- save / load -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the embedder atomically (temp folder, then rename) as an embedkit + sentence-transformers
        folder. A peft-wrapped backbone is saved merged."""
        hooked = self.forward_hook is not None or self.attention_bias is not None
        st_export.warn_if_differs(self.config, self.active_pooler, hooked, Path(path))
        return atomic_write_dir(path, self._write)

    def _write(self, folder: Path) -> None:
        backbone = merged_copy(self.backbone)
        backbone.config.is_causal = self.config.attention == "causal"
        backbone.save_pretrained(folder, safe_serialization=True)
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.padding_side = "right"  # sentence-transformers uses arange positions: right padding only
        tokenizer.save_pretrained(folder)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        st_export.write_sentence_transformers(folder, self.config, self.active_pooler, self.dimension)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None, trust_remote_code: bool = False,
    ) -> Embedder:
        """Load what ``save`` wrote. ``dtype`` defaults to the saved config's (``auto`` = the fast dtype)."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{path} is not an embedkit embedder folder (no {CONFIG_FILE}). For a plain model use "
                "Embedder.from_pretrained(path)."
            )
        config = EmbedderConfig.from_dict(json.loads(config_path.read_text()))
        backbone, _ = load_backbone(
            path, dtype=dtype or config.dtype, device=device, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        pooling = pooler_class(config.pooling)
        pooler = pooling.load_saved(st_export.pooler_folder(path, config.pooling)).to(device) \
            if pooling.trainable else None
        embedder = cls(backbone, tokenizer, config, pooler)
        apply_methods(embedder)
        return embedder


# Config fields that only change how texts are prepared or vectors finished: safe to override on a saved model.
RUNTIME_FIELDS = ("max_length", "normalize", "query_instruction", "document_instruction", "template")


def open_model(
    spec: str | os.PathLike,
    *,
    attention: str | None = None,
    pooling: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **overrides,
) -> Embedder:
    """The one way to open a model: a saved embedder folder, or any backbone spec wrapped as an embedder.

    One override policy: a setting given (not None) either applies or is refused with a one-line error, never
    silently dropped. On a saved folder, ``attention`` switches the mode (verified by the probe), the runtime
    fields (``max_length``, ``normalize``, instructions, ``template``) replace the saved ones, and ``pooling``
    or ``latent_attention`` must equal what was saved: the weights were trained with them. A backbone spec with
    a trainable pooling is refused: its pooler would be untrained (``Embedder.from_pretrained`` builds one for
    training).
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    allowed = set(RUNTIME_FIELDS) | {"latent_attention"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"open_model() got unknown settings {unknown}; valid: attention, pooling, dtype, "
                        f"{', '.join(sorted(allowed))}.")
    if dtype is not None and not isinstance(dtype, torch.dtype) and dtype != "auto":
        resolve_dtype(dtype)  # a bad name fails before any loading
    folder = Path(spec)
    if not (folder / CONFIG_FILE).is_file():
        if pooling is not None and pooler_class(pooling).trainable:
            raise ValueError(f"pooling={pooling!r} on {spec} would be a new, untrained pooler (random vectors that "
                             "change every run): open a saved embedder folder that has a trained one, or train one "
                             "with 'embedkit train'.")
        return Embedder.from_pretrained(
            spec, attention=attention or "causal", pooling=pooling or "mean", dtype=dtype or "auto", device=device,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, **overrides,
        )
    saved = EmbedderConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    if pooling is not None and pooling != saved.pooling:
        raise ValueError(f"{spec} is a saved embedder with pooling={saved.pooling!r}; pooling={pooling!r} does "
                         "not apply to it (drop the pooling setting, or open its backbone spec instead).")
    if "latent_attention" in overrides and overrides.pop("latent_attention") != saved.latent_attention:
        raise ValueError(f"{spec} is a saved embedder with a trained latent-attention pooler; its settings "
                         "cannot be overridden.")
    embedder = Embedder.load(folder, device=device, dtype=None if dtype == "auto" else dtype,
                             attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if attention is not None and attention != embedder.config.attention:
        embedder.set_attention(attention)
    if overrides:
        embedder.config = EmbedderConfig.from_dict({**embedder.config.to_dict(), **overrides})
    return embedder
