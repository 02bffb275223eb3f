"""Token Prepending: the placeholder carries the previous layer's last-token state in the chosen layers only,
earlier tokens then see the sentence under causal attention, padding side does not matter, early exit stops
at the right layer, and the setting survives save / load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from embedkit import Embedder
from embedkit.backbone import decoder_layers
from embedkit.methods.common import first_match, last_index
from embedkit.methods.token_prepending import (
    PROMPTS,
    TokenPrependingSettings,
    enable_token_prepending,
    parse_layer_range,
)

TEXTS = ["The quick brown fox jumps over the lazy dog", "A cat sat on the mat today", "Hi there"]


def stories_embedder(stories_path, **kwargs) -> Embedder:
    return Embedder.from_pretrained(stories_path, dtype="float32", **kwargs)


def batch(embedder: Embedder, texts, padding_side="right"):
    return embedder.collate(embedder.tokenize(texts), padding_side=padding_side)


def capture_layer_io(embedder: Embedder, texts, padding_side="right"):
    """Run the embedder's forward; return (inputs, outputs) hidden states of every decoder layer."""
    layers = decoder_layers(embedder.backbone)
    inputs, outputs = {}, {}

    def hook(index):
        def record(module, args, kwargs, output):
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            outputs[index] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    ids, mask, _ = batch(embedder, texts, padding_side)
    try:
        with torch.inference_mode():
            embedder.hidden_states(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return ids, mask, inputs, outputs


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_placeholder_carries_last_token_state_in_range_only(stories_path, padding_side):
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, start_layer=1, end_layer=3)
    pst = embedder.tokenizer.convert_tokens_to_ids("<PST>")
    ids, mask, inputs, outputs = capture_layer_io(embedder, TEXTS, padding_side)
    rows = torch.arange(len(TEXTS))
    where, last = first_match(ids, pst, mask), last_index(mask)
    assert (where >= 0).all() and (where < last).all()
    for layer in range(1, 5):
        previous = outputs[layer - 1]
        received = inputs[layer]
        if layer in (1, 2):  # overwritten with the previous layer's last-token state
            torch.testing.assert_close(received[rows, where], previous[rows, last], atol=0, rtol=0)
            assert not torch.allclose(previous[rows, where], previous[rows, last])
        else:  # outside the range the placeholder keeps its own state
            torch.testing.assert_close(received[rows, where], previous[rows, where], atol=0, rtol=0)
        others = mask.bool().clone()
        others[rows, where] = False
        torch.testing.assert_close(received[others], previous[others], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])  # llama: the stories tests above
def test_every_architecture_overwrites_placeholder(arch):
    model, tokenizer = tiny_model(arch, "eager")
    embedder = Embedder.from_pretrained(arch, backbone=copy.deepcopy(model), tokenizer=tokenizer)
    enable_token_prepending(embedder, start_layer=1, end_layer=2)
    ids, mask, inputs, outputs = capture_layer_io(embedder, TEXTS[:2], "left")
    rows = torch.arange(2)
    where = first_match(ids, embedder.tokenizer.convert_tokens_to_ids("<PST>"), mask)
    torch.testing.assert_close(inputs[1][rows, where], outputs[0][rows, last_index(mask)], atol=0, rtol=0)


def moved_before_difference(embedder: Embedder, a: str, b: str, after: int = -1) -> float:
    """Largest change of a token state, over positions before the first differing token (and after ``after``)."""
    (ids_a, mask_a, _), (ids_b, mask_b, _) = batch(embedder, [a]), batch(embedder, [b])
    assert ids_a.shape == ids_b.shape
    differ = int(torch.nonzero(ids_a[0] != ids_b[0])[0])
    with torch.inference_mode():
        ha, hb = embedder.hidden_states(ids_a, mask_a)[0], embedder.hidden_states(ids_b, mask_b)[0]
    assert differ > after + 1
    return float((ha[after + 1:differ] - hb[after + 1:differ]).abs().max())


def test_earlier_tokens_see_the_whole_sentence(stories_path):
    """Under plain causal attention the sentence's first words ignore its last word; with TP they do not."""
    a, b = "The little dog ran home", "The little dog ran away"
    plain = stories_embedder(stories_path, pooling="last", template=PROMPTS["prompteol"].replace("<PST> ", ""))
    tp = stories_embedder(stories_path)
    enable_token_prepending(tp, start_layer=1, end_layer=4)
    pst = int(first_match(batch(tp, [a])[0], tp.tokenizer.convert_tokens_to_ids("<PST>"))[0])
    assert moved_before_difference(plain, a, b) < 1e-5
    assert moved_before_difference(tp, a, b, after=pst) > 1e-3


def test_padding_side_and_batching_do_not_change_vectors(stories_path):
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, start_layer=1, end_layer=4)
    left = embedder.encode(TEXTS, padding_side="left")
    right = embedder.encode(TEXTS, padding_side="right")
    alone = [embedder.encode([t])[0] for t in TEXTS]
    assert torch.allclose(torch.from_numpy(left), torch.from_numpy(right), atol=1e-5)
    for row, single in zip(left, alone, strict=True):
        assert torch.allclose(torch.from_numpy(row), torch.from_numpy(single), atol=1e-5)


def test_tp_changes_the_embedding_and_start_equal_end_minus_one_is_a_single_layer(stories_path):
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, start_layer=1, end_layer=4)
    with_tp = embedder.encode(TEXTS)
    embedder.forward_hook = None  # same prompt and placeholder, no overwriting
    without = embedder.encode(TEXTS)
    assert (abs(with_tp - without)).max() > 1e-3


def test_early_exit_returns_that_layers_output(stories_path):
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, start_layer=1, end_layer=4, output_layer=2)
    ids, mask, inputs, outputs = capture_layer_io(embedder, TEXTS)
    assert sorted(outputs) == [0, 1], "layers after the output layer must not run"
    with torch.inference_mode():
        hidden = embedder.hidden_states(ids, mask)
    torch.testing.assert_close(hidden, outputs[1], atol=0, rtol=0)


def test_save_and_load_reproduce_vectors(stories_path, tmp_path):
    embedder = stories_embedder(stories_path)
    vocab = embedder.backbone.get_input_embeddings().weight.shape[0]
    enable_token_prepending(embedder, "cot", start_layer=1, end_layer=3, output_layer=4)
    assert embedder.backbone.get_input_embeddings().weight.shape[0] == vocab + 1
    before = embedder.encode(TEXTS)
    embedder.save(tmp_path / "tp")
    saved = json.loads((tmp_path / "tp" / "embedkit.json").read_text())
    assert saved["methods"]["token_prepending"]["end_layer"] == 3
    assert saved["template"] == PROMPTS["cot"] and saved["pooling"] == "last"
    loaded = Embedder.load(tmp_path / "tp")
    assert loaded.forward_hook is not None
    assert loaded.backbone.get_input_embeddings().weight.shape[0] == vocab + 1
    torch.testing.assert_close(torch.from_numpy(loaded.encode(TEXTS)), torch.from_numpy(before), atol=1e-6, rtol=0)


def test_placeholder_row_is_deterministic(stories_path):
    a, b = stories_embedder(stories_path), stories_embedder(stories_path)
    enable_token_prepending(a)
    enable_token_prepending(b)
    row = a.tokenizer.convert_tokens_to_ids("<PST>")
    assert torch.equal(a.backbone.get_input_embeddings().weight[row], b.backbone.get_input_embeddings().weight[row])


def test_refuses_bad_settings(stories_path):
    embedder = stories_embedder(stories_path)
    with pytest.raises(ValueError, match="template"):
        enable_token_prepending(embedder, 'This sentence : "{text}" means in one word:"')
    with pytest.raises(ValueError, match="start_layer < end_layer"):
        TokenPrependingSettings(start_layer=3, end_layer=3)
    with pytest.raises(ValueError, match="Unknown token_prepending settings"):
        TokenPrependingSettings.from_dict({"layers": 3})
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, end_layer=9)
    with pytest.raises(ValueError, match="end_layer=9"):
        embedder.encode(TEXTS)
    assert parse_layer_range("1:8") == (1, 8)
    with pytest.raises(ValueError, match="START:END"):
        parse_layer_range("1-8")


def test_cli_embed_option(stories_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from embedkit.cli import app  # noqa: PLC0415

    runner = CliRunner()
    args = ["embed", str(stories_path), "A cat sat on the mat today", "--dtype", "float32", "--json"]
    result = runner.invoke(app, args + ["--token-prepending", "1:3", "--tp-output-layer", "4"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["embeddings"][0]
    embedder = stories_embedder(stories_path)
    enable_token_prepending(embedder, start_layer=1, end_layer=3, output_layer=4)
    want = embedder.encode(["A cat sat on the mat today"])[0]
    assert torch.allclose(torch.tensor(got), torch.from_numpy(want), atol=1e-5)
    bad = runner.invoke(app, args + ["--token-prepending", "1-3"])
    assert bad.exit_code == 2 and "START:END" in bad.output


def test_recipes_build_and_save(stories_path, tmp_path):
    import yaml  # noqa: PLC0415

    from embedkit.methods.token_prepending import build_from_recipe, main  # noqa: PLC0415

    recipe = tmp_path / "tp.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"base": str(stories_path), "dtype": "float32"},
                                      "token_prepending": {"prompt": "ke", "start_layer": 1, "end_layer": 3}}))
    embedder = build_from_recipe(recipe)
    assert embedder.config.template == PROMPTS["ke"] and embedder.config.methods["token_prepending"]["end_layer"] == 3
    main([str(recipe), "--save", str(tmp_path / "out")])
    assert Embedder.load(tmp_path / "out").config.methods == embedder.config.methods
    root = Path(__file__).resolve().parent.parent / "recipes"
    shipped = sorted(root.glob("tp-*.yaml"))
    assert shipped, "recipes/tp-*.yaml missing"
    for path in shipped:  # every shipped recipe's settings are valid (models are not loaded here)
        data = yaml.safe_load(path.read_text())
        settings = dict(data["token_prepending"])
        assert settings.pop("prompt", "prompteol") in PROMPTS
        TokenPrependingSettings.from_dict(settings)
