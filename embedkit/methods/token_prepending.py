"""Token Prepending (Fu et al., ACL 2025): training-free, causal attention, earlier tokens see the sentence.

A placeholder token ``<PST>`` sits before the sentence inside the prompt. Before each decoder layer in
``[start_layer, end_layer)`` (0-based) its hidden state is overwritten with the *last* token's hidden state
from the previous layer, i.e. the sentence embedding decoded so far. The sentence's tokens come after the
placeholder, so under causal attention they read the whole sentence through it. Optionally the embedding is
taken after ``output_layer`` decoder layers (early exit, the paper's layer 27 of 32; the remaining layers are
then not run at all) instead of after the last layer and the final norm.

The official code (github.com/fuyuchenIfyw/token_prepending) does this inside copied modeling files with
left padding and ``hidden_states[:, -1]``; here forward pre-hooks on the model's own layers do it and the last
token is located per row, so any padding side and any decoder-only architecture work.

Use ``enable_token_prepending(embedder, ...)``: it adds the placeholder to the tokenizer (one new embedding
row, initialised deterministically), sets the prompt and last-token pooling, installs the hook and records the
settings in the embedder config, so ``save`` / ``Embedder.load`` reproduce the same vectors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from pydantic import model_validator

from embedkit import attention as attn
from embedkit.backbone import decoder_layers
from embedkit.embedder import Embedder
from embedkit.io import StrictConfig
from embedkit.method_registry import enable_method, register_method
from embedkit.methods.common import add_tokens, first_match, last_index

NAME = "token_prepending"
PLACEHOLDER = "<PST>"

# The paper's prompts with the placeholder before the quoted sentence (PromptEOL, Pretended CoT, Knowledge
# Enhancement; the last two from Zhang et al. 2024 "Simple techniques for enhancing sentence embeddings").
PROMPTS = {
    "prompteol": 'This sentence : <PST> "{text}" means in one word:"',
    "cot": 'After thinking step by step , this sentence : <PST> "{text}" means in one word:"',
    "ke": ("The essence of a sentence is often captured by its main subjects and actions, while descriptive terms "
           'provide additional but less central details. With this in mind , this sentence : <PST> "{text}" means '
           'in one word:"'),
}


class TokenPrependingSettings(StrictConfig):
    """What ``embedkit.json`` stores under ``methods.token_prepending``."""

    label = "token_prepending settings"

    start_layer: int = 1  # first decoder layer (0-based) whose input gets the placeholder overwritten
    end_layer: int = 8  # exclusive; the paper's Llama-2-7B setting is 1..7 of 32 layers
    output_layer: int | None = None  # take the states after this many layers (early exit); None = all + norm
    placeholder: str = PLACEHOLDER
    placeholder_init: str = "random"  # new embedding row: 'random' (as the paper, but seeded) or 'mean'
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TokenPrependingSettings:
        if self.start_layer < 0 or self.end_layer <= self.start_layer:
            raise ValueError(f"Token Prepending needs 0 <= start_layer < end_layer, got {self.start_layer}, "
                             f"{self.end_layer}.")
        if self.output_layer is not None and self.output_layer < 1:
            raise ValueError(f"output_layer counts decoder layers from 1, got {self.output_layer}.")
        if self.placeholder_init not in ("random", "mean"):
            raise ValueError(f"placeholder_init must be 'random' or 'mean', got {self.placeholder_init!r}.")
        return self


def parse_layer_range(text: str) -> tuple[int, int]:
    """'1:8' -> (1, 8): decoder layers 1..7 (0-based, end exclusive) get the placeholder overwritten."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"A layer range is START:END (0-based, END exclusive), e.g. 1:8; got {text!r}.") from None
    return start, end


class _EarlyExit(Exception):
    """Raised from the output layer's forward hook to stop the backbone; carries that layer's output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


class TokenPrependingHook:
    """The embedder's ``forward_hook``: run the backbone with the placeholder overwritten in early layers."""

    def __init__(self, settings: TokenPrependingSettings, placeholder_id: int):
        self.settings = settings
        self.placeholder_id = placeholder_id

    def __call__(self, embedder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = self.settings
        model = embedder.backbone
        layers = decoder_layers(model)
        n_layers = len(layers)
        if s.output_layer is not None and s.output_layer > n_layers:
            raise ValueError(f"output_layer={s.output_layer} but the model has {n_layers} decoder layers.")
        if s.end_layer > n_layers:
            raise ValueError(f"end_layer={s.end_layer} but the model has {n_layers} decoder layers.")
        placeholder = first_match(input_ids, self.placeholder_id, attention_mask)
        if (placeholder < 0).any():
            rows = torch.nonzero(placeholder < 0).flatten().tolist()
            raise ValueError(f"Token Prepending: rows {rows[:5]} have no {s.placeholder} token. The template must "
                             f"contain it (e.g. {PROMPTS['prompteol']!r}) and max_length must keep it.")
        last = last_index(attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)

        def overwrite(module, args, kwargs):
            if args:
                hidden = args[0]
                return (hidden.index_put((rows, placeholder), hidden[rows, last]),) + tuple(args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            kwargs["hidden_states"] = hidden.index_put((rows, placeholder), hidden[rows, last])
            return args, kwargs

        def stop(module, args, output):
            raise _EarlyExit(_hidden_of(output))

        stop_at = s.output_layer if s.output_layer is not None and s.output_layer < n_layers else None
        handles = [layers[i].register_forward_pre_hook(overwrite, with_kwargs=True)
                   for i in range(s.start_layer, min(s.end_layer, stop_at or n_layers))]
        if stop_at is not None:
            handles.append(layers[stop_at - 1].register_forward_hook(stop))
        inputs = attn.model_inputs(model, input_ids, attention_mask, embedder.attention_bias)
        try:
            return model(**inputs, use_cache=False).last_hidden_state
        except _EarlyExit as done:
            return done.hidden
        finally:
            for handle in handles:
                handle.remove()


@register_method(NAME)
def apply(embedder, settings: dict) -> dict:
    """Install Token Prepending on an embedder (idempotent; used by ``Embedder.load``)."""
    parsed = TokenPrependingSettings.from_dict(settings)
    template = embedder.config.template
    if template is None or parsed.placeholder not in template:
        raise ValueError(f"Token Prepending needs a template with the placeholder {parsed.placeholder} before the "
                         f"text, e.g. {PROMPTS['prompteol']!r}; got {template!r}.")
    if embedder.config.pooling != "last":
        raise ValueError(f"Token Prepending embeds with the last token (pooling='last'); got "
                         f"{embedder.config.pooling!r}.")
    (placeholder_id,), _ = add_tokens(embedder.tokenizer, embedder.backbone, [parsed.placeholder],
                                      init=parsed.placeholder_init, seed=parsed.seed, special=True)
    embedder.forward_hook = TokenPrependingHook(parsed, placeholder_id)
    return parsed.to_dict()


def enable_token_prepending(embedder, prompt: str = "prompteol", *, start_layer: int = 1, end_layer: int = 8,
                            output_layer: int | None = None, **settings) -> None:
    """Turn an embedder into a Token Prepending one: prompt (a name in ``PROMPTS`` or a template with
    ``<PST>`` and ``{text}``), last-token pooling, the layer range, and the saved settings."""
    template = PROMPTS.get(prompt, prompt)
    if "{text}" not in template:
        raise ValueError(f"Unknown prompt {prompt!r}: give one of {sorted(PROMPTS)} or a template with '{{text}}'.")
    embedder.config.template = template
    embedder.config.pooling = "last"
    enable_method(embedder, NAME, {"start_layer": start_layer, "end_layer": end_layer, "output_layer": output_layer,
                            **settings})


def enable_from_option(embedder, layer_range: str, prompt: str = "prompteol", output_layer: int | None = None) -> None:
    """The CLI's ``--token-prepending START:END [--tp-prompt P] [--tp-output-layer N]``."""
    start, end = parse_layer_range(layer_range)
    enable_token_prepending(embedder, prompt, start_layer=start, end_layer=end, output_layer=output_layer)


# -- recipes: Token Prepending needs no training, so its "recipe" builds (and saves) an embedder ---------------

def build_from_recipe(path) -> object:
    """An embedder from a Token Prepending recipe (YAML): ``model`` (base, dtype, max_length) and
    ``token_prepending`` (prompt, start_layer, end_layer, output_layer, placeholder_init)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "model" not in data or NAME not in data:
        raise ValueError(f"{path}: a Token Prepending recipe has 'model' and '{NAME}' sections.")
    model = dict(data["model"])
    unknown = sorted(set(model) - {"base", "dtype", "max_length", "attn_implementation"})
    if unknown:
        raise ValueError(f"{path}: unknown model keys {unknown}; valid: base, dtype, max_length, attn_implementation.")
    base = model.pop("base")
    embedder = Embedder.from_pretrained(base, pooling="last", **model)
    settings = dict(data[NAME])
    prompt = settings.pop("prompt", "prompteol")
    enable_token_prepending(embedder, prompt, **settings)
    return embedder


def main(argv: list[str] | None = None) -> None:
    """``python -m embedkit.methods.token_prepending RECIPE --save DIR``: build and save a TP embedder."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--save", required=True, help="Folder to write the embedder to (Embedder.load reads it).")
    args = parser.parse_args(argv)
    print(build_from_recipe(args.recipe).save(args.save))


if __name__ == "__main__":
    main()
