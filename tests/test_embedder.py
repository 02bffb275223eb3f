"""Embedder on the real stories260K model: encode, bad input, save/load, sentence-transformers round trip."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from embedkit import Embedder, EmbedderConfig
from embedkit.backbone import ModelNotFoundError, fast_dtype, resolve_dtype, resolve_spec
from embedkit.batching import collate, plan_batches, plan_for_workers, run_batches, split_for_workers

TEXTS = ["Once upon a time there was a little girl.", "The dog ran to the park.", "Lily liked to play.",
         "One day, a big bird flew over the house and sang a song for everyone to hear."]


@pytest.fixture(scope="module")
def stories(stories_path):
    return Embedder.from_pretrained(stories_path, dtype="float32")


def test_encode_shape_order_and_norm(stories):
    vectors = stories.encode(TEXTS)
    assert vectors.shape == (4, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # order is restored although batches are sorted by length
    np.testing.assert_allclose(stories.encode(TEXTS[::-1]), vectors[::-1], atol=1e-5)
    np.testing.assert_allclose(stories.encode(TEXTS, max_batch_tokens=16, batch_size=1), vectors, atol=1e-5)
    raw = stories.encode(TEXTS, normalize=False)
    assert np.linalg.norm(raw, axis=1).min() > 1.5  # really un-normalised


def test_query_and_document_roles(stories_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", query_instruction="Question: ",
                                        document_instruction="Story: ")
    queries = embedder.encode_queries(TEXTS[:2])
    documents = embedder.encode_documents(TEXTS[:2])
    np.testing.assert_allclose(queries, embedder.encode(TEXTS[:2], instruction="Question: "), atol=1e-6)
    assert np.abs(queries - documents).max() > 1e-3


@pytest.mark.parametrize("bad,error,message", [
    (["ok", ""], ValueError, "Text at index 1 is empty or whitespace only"),
    (["ok", "   \n"], ValueError, "Text at index 1 is empty or whitespace only"),
    (["ok", "fine", 3], TypeError, "Text at index 2 is int, not str"),
    ("just a string", TypeError, "takes a list of texts, got one string"),
])
def test_bad_texts(stories, bad, error, message):
    with pytest.raises(error, match=message):
        stories.encode(bad)


def test_truncation_warns_once_with_count(stories_path, caplog):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", max_length=8)
    with caplog.at_level(logging.WARNING, logger="embedkit.embedder"):
        vectors = embedder.encode(TEXTS + ["Hi"])
    messages = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    too_long = sum(len(embedder.tokenizer(t)["input_ids"]) > 8 for t in TEXTS + ["Hi"])
    assert too_long == 3  # the long story sentences; "Lily liked to play." and "Hi" fit
    assert messages == ["3 of 5 texts were longer than max_length=8 tokens and were truncated."]
    assert vectors.shape == (5, 64)
    assert max(len(s) for s in embedder.tokenize(TEXTS).ids) == 8


def test_save_warns_with_the_final_folder_when_sentence_transformers_differs(stories_path, tmp_path, caplog):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", pooling="last", template="Say {text}")
    with caplog.at_level(logging.WARNING, logger="embedkit.embedder"):
        embedder.save(tmp_path / "saved")
    messages = [r.getMessage() for r in caplog.records if "cannot reproduce" in r.getMessage()]
    assert messages == [f"sentence-transformers cannot reproduce a template or attention/forward hook: "
                        f"SentenceTransformer({tmp_path / 'saved'}) will load but give different vectors; use "
                        "embedkit.Embedder.load for this model."]


def test_missing_model_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_spec(tmp_path / "nope")
    assert "resolved to nothing. Tried:" in str(err.value) and "local folder" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="Valid aliases: smollm2-135m, gemma3-270m"):
        Embedder.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_spec(tmp_path / "empty")


def test_spec_kinds(stories_path, tmp_path):
    assert resolve_spec(stories_path).gguf_file is None
    hub = resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_local and hub.path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_spec(gguf).gguf_file == "m.gguf"
    smol = resolve_spec("smollm2-135m")  # installed by `make setup`
    assert smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_dtype_choice():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto") is fast_dtype("cpu")
    flags = open("/proc/cpuinfo").read()
    expected = torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32
    assert fast_dtype("cpu") is expected
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'; valid: auto, float32, bfloat16, float16"):
        resolve_dtype("fp8")


def test_config_validation():
    with pytest.raises(ValueError, match="template must contain"):
        EmbedderConfig(backbone="x", template="no placeholder")
    with pytest.raises(ValueError, match="Unknown EmbedderConfig keys \\['colour'\\]"):
        EmbedderConfig.from_dict({"backbone": "x", "colour": "red"})


def test_parallel_workers_give_the_same_vectors(stories):
    texts = [f"{t} ({i})" for i in range(12) for t in TEXTS]
    one = stories.encode(texts, workers=1)
    np.testing.assert_allclose(stories.encode(texts, workers=3, max_batch_tokens=64), one, atol=1e-5)
    threads = torch.get_num_threads()
    stories.encode(texts, workers=2)
    assert torch.get_num_threads() == threads  # the process-wide setting is restored
    with pytest.raises(ValueError, match="workers must be >= 1"):
        stories.encode(texts, workers=0)


def test_parallel_batches_raise_the_first_error_and_stateful_hooks_run_alone(stories):
    seen = []

    def step(batch):
        seen.append(torch.get_num_threads())
        if batch == [2]:
            raise RuntimeError("batch 2 failed")

    with pytest.raises(RuntimeError, match="batch 2 failed"):
        run_batches([[0], [1], [2], [3]], step, workers=2)
    assert set(seen) == {1}  # each worker runs torch single-threaded
    assert split_for_workers([10] * 40, max_batch_tokens=2048, workers=2) == 50  # 4 batches per worker
    assert split_for_workers([300, 10], max_batch_tokens=2048, workers=2) == 300  # never below the longest text
    stories.forward_hook = lambda embedder, ids, mask: embedder.backbone(input_ids=ids, attention_mask=mask)[0]
    try:
        assert stories.default_workers() == 1
        stories.forward_hook.thread_safe = True
        assert stories.default_workers() == torch.get_num_threads()
    finally:
        stories.forward_hook = None


def test_batch_plan_respects_budget_and_covers_all():
    lengths = [5, 30, 7, 7, 100, 2, 64]
    plan = plan_batches(lengths, max_batch_tokens=128, max_batch=3)
    assert sorted(i for batch in plan for i in batch) == list(range(7))
    for batch in plan:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 128
    assert plan_for_workers(lengths, max_batch_tokens=128, max_batch=3, workers=1) == plan


def test_worker_plan_gives_each_worker_equally_full_batches():
    lengths = [10] * 90  # a share of 112 tokens cuts 8 full batches and a part-filled ninth
    budget = split_for_workers(lengths, 2048, 2)
    assert [len(b) for b in plan_batches(lengths, max_batch_tokens=budget)] == [11] * 8 + [2]
    plan = plan_for_workers(lengths, max_batch_tokens=2048, workers=2)
    assert [len(b) for b in plan] == [9] * 10  # 5 batches per worker, all the same size
    assert sorted(i for batch in plan for i in batch) == list(range(90))
    mixed = [3 + (i * 7) % 40 for i in range(500)]
    for workers in (2, 3):
        plan = plan_for_workers(mixed, max_batch_tokens=2048, max_batch=64, workers=workers)
        assert len(plan) % workers == 0 and sorted(i for b in plan for i in b) == list(range(500))
        assert all(len(b) <= 64 for b in plan)


def test_collate_pads_and_masks_the_instruction():
    ids, mask, pool = collate([[1, 2, 3], [4]], [1, 0], pad_id=0, padding_side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert pool.tolist() == [[0, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("attention,pooling", [("causal", "mean"), ("causal", "last"), ("bidirectional", "mean"),
                                               ("causal", "weighted_mean"), ("bidirectional", "first")])
def test_save_load_and_sentence_transformers_round_trip(stories_path, tmp_path, attention, pooling):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", attention=attention, pooling=pooling,
                                        query_instruction="Question: ")
    expected = embedder.encode(TEXTS)
    expected_q = embedder.encode_queries(TEXTS)
    folder = embedder.save(tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["is_causal"] is (attention == "causal")

    loaded = Embedder.load(folder)
    assert loaded.config == embedder.config
    assert loaded.fingerprint() == embedder.fingerprint()
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, atol=1e-5)

    st = SentenceTransformer(str(folder))
    for got, want in ((st.encode(TEXTS), expected), (st.encode(TEXTS, prompt_name="query"), expected_q)):
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() >= 0.9999, cosine


def test_latent_attention_saves_as_custom_module(stories_path, tmp_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32", pooling="latent_attention",
                                        latent_attention={"num_latents": 16, "num_heads": 4})
    expected = embedder.encode(TEXTS)
    folder = embedder.save(tmp_path / "latent")
    modules = json.loads((folder / "modules.json").read_text())
    assert modules[1]["type"] == "embedkit.pooling.LatentAttentionPooling"
    np.testing.assert_allclose(Embedder.load(folder).encode(TEXTS), expected, atol=1e-5)
    st = SentenceTransformer(str(folder), trust_remote_code=True)
    np.testing.assert_allclose(st.encode(TEXTS), expected, atol=1e-4)


def test_save_is_atomic_and_replaces(stories, tmp_path):
    target = tmp_path / "m"
    stories.save(target)
    stories.save(target)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or .old folders left
    with pytest.raises(FileNotFoundError, match="not an embedkit embedder folder"):
        Embedder.load(tmp_path)


def test_fingerprint_changes_with_weights(stories_path):
    a = Embedder.from_pretrained(stories_path, dtype="float32")
    b = Embedder.from_pretrained(stories_path, dtype="float32")
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.backbone.norm.weight.add_(1e-3)
    assert a.fingerprint() != b.fingerprint()


def test_layers_compile_with_the_cpp_wrapper(stories_path, monkeypatch):
    from embedkit.compilation import compile_decoder_layers  # noqa: PLC0415

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(k))
    embedder = Embedder.from_pretrained(stories_path, dtype="float32")
    assert compile_decoder_layers(embedder.backbone) == embedder.backbone.config.num_hidden_layers
    # inductor's C++ wrapper releases the GIL, so encode's worker threads overlap (bench/README.md)
    assert calls == [{"dynamic": True, "options": {"cpp_wrapper": True}}] * embedder.backbone.config.num_hidden_layers


def test_compiled_layers_give_the_same_vectors_and_weights(stories_path):
    from embedkit.compilation import is_compiled  # noqa: PLC0415

    embedder = Embedder.from_pretrained(stories_path, dtype="float32")
    texts = [f"{t} ({i})" for i in range(6) for t in TEXTS]
    eager, fingerprint, keys = embedder.encode(texts), embedder.fingerprint(), list(embedder.state_dict())
    assert not is_compiled(embedder.backbone)
    embedder.compile_layers()
    assert is_compiled(embedder.backbone)
    assert embedder.backbone.config._attn_implementation == "eager"  # what inductor can fuse, unlike sdpa's kernel
    # batches of several sizes and lengths: one dynamic-shape graph serves them all
    np.testing.assert_allclose(embedder.encode(texts, max_batch_tokens=64), eager, atol=1e-4)
    assert embedder.fingerprint() == fingerprint and list(embedder.state_dict()) == keys
    assert torch._dynamo.config.cache_size_limit >= 8 * embedder.backbone.config.num_hidden_layers
    embedder.forward_hook = lambda e, ids, mask: e.backbone(input_ids=ids, attention_mask=mask)[0]
    with pytest.raises(ValueError, match="does not apply under a forward hook"):
        embedder.compile_layers()


def test_open_model_applies_or_refuses_every_override(stories_path, tmp_path):
    from embedkit.embedder import open_model

    saved = tmp_path / "saved"
    Embedder.from_pretrained(stories_path, dtype="float32", pooling="mean", max_length=64).save(saved)
    opened = open_model(saved, attention="bidirectional", max_length=32, template="Q: {text}", normalize=False)
    assert (opened.config.attention, opened.config.max_length) == ("bidirectional", 32)
    assert (opened.config.template, opened.config.normalize) == ("Q: {text}", False)
    assert open_model(saved).config.max_length == 64  # nothing given: as saved
    with pytest.raises(ValueError, match="pooling='mean'; pooling='last' does not apply"):
        open_model(saved, pooling="last")
    with pytest.raises(TypeError, match=r"unknown settings \['max_tokens'\]"):
        open_model(saved, max_tokens=8)
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        open_model(saved, dtype="fp8")
    fresh = open_model(stories_path, pooling="last", max_length=16, dtype="float32")
    assert (fresh.config.pooling, fresh.config.max_length, fresh.config.attention) == ("last", 16, "causal")


# -- the batch budget's name, Matryoshka dimensions, configs ------------------------------------------------------
def test_max_tokens_is_a_deprecated_alias_of_max_batch_tokens(stories):
    expected = stories.encode(TEXTS, max_batch_tokens=16)
    with pytest.warns(FutureWarning, match=r"max_tokens=\) is deprecated.*use max_batch_tokens="):
        got = stories.encode(TEXTS, max_tokens=16)
    np.testing.assert_array_equal(got, expected)


def test_dimensions_truncate_then_renormalise(stories, caplog):
    full = stories.encode(TEXTS, normalize=False)
    short = stories.encode(TEXTS, dimensions=16)
    assert short.shape == (4, 16)
    np.testing.assert_allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(stories.encode(TEXTS, dimensions=16, normalize=False), full[:, :16], atol=1e-6)
    np.testing.assert_array_equal(stories.encode(TEXTS, dimensions=64), stories.encode(TEXTS))
    for bad in (0, 65):
        with pytest.raises(ValueError, match=rf"^dimensions={bad} is out of range: this model's vectors have 64 "
                                             r"components; give 1 to 64 \(or none for all\)\.$"):
            stories.encode(TEXTS, dimensions=bad)
    assert "Matryoshka" not in caplog.text  # not a Matryoshka-trained model: nothing to warn about


def test_matryoshka_dims_are_recorded_and_other_dims_warn_once(stories_path, tmp_path, caplog):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32")
    before = embedder.fingerprint()
    assert "matryoshka_dims" not in embedder.config.to_dict()  # old configs keep their key set and fingerprint
    embedder.config.matryoshka_dims = [16, 32, 64]
    assert embedder.fingerprint() != before
    loaded = Embedder.load(embedder.save(tmp_path / "m"))
    assert loaded.config.matryoshka_dims == [16, 32, 64]
    with caplog.at_level(logging.WARNING, logger="embedkit.embedder"):
        loaded.encode(TEXTS, dimensions=32)
        assert "Matryoshka" not in caplog.text
        loaded.encode(TEXTS, dimensions=24)
    warnings = [r for r in caplog.records if "Matryoshka" in r.getMessage()]
    assert len(warnings) == 1 and "dimensions=24 is not one of the Matryoshka dims" in warnings[0].getMessage()
    with pytest.raises(ValueError, match=r"matryoshka_dims must be a non-empty list of positive widths, got \[0\]"):
        EmbedderConfig(backbone="x", matryoshka_dims=[0])


OLD_EMBEDKIT_JSON = {  # as the code before the pydantic config wrote it (tests/fixtures/saved-embedder-v0)
    "backbone": "/work/shared/models/stories260K", "attention": "bidirectional", "pooling": "mean",
    "max_length": 512, "normalize": True, "dtype": "float32", "query_instruction": "q: ",
    "document_instruction": None, "template": None, "latent_attention": None, "methods": {},
}


def test_old_saved_config_loads_with_the_same_keys():
    config = EmbedderConfig.from_dict(dict(OLD_EMBEDKIT_JSON))
    assert config.to_dict() == OLD_EMBEDKIT_JSON  # same keys and values: the fingerprint's hash input is unchanged
    assert list(config.to_dict()) == list(OLD_EMBEDKIT_JSON)


def test_saved_folder_from_before_the_redesign_loads(stories_path, tmp_path):
    import pathlib  # noqa: PLC0415

    fixture = pathlib.Path(__file__).parent / "fixtures" / "saved-embedder-v0"
    if not fixture.is_dir():  # the golden branch adds it; until then build the same folder and rewrite its config
        fixture = Embedder.from_pretrained(stories_path, dtype="float32", attention="bidirectional",
                                           query_instruction="q: ").save(tmp_path / "v0")
        (fixture / "embedkit.json").write_text(json.dumps(OLD_EMBEDKIT_JSON, indent=2))
    loaded = Embedder.load(fixture)
    assert loaded.config.to_dict() == json.loads((fixture / "embedkit.json").read_text())
    fresh = Embedder.from_pretrained(stories_path, dtype="float32", attention="bidirectional", query_instruction="q: ")
    np.testing.assert_allclose(loaded.encode(TEXTS), fresh.encode(TEXTS), atol=1e-6)


def test_configs_refuse_bad_values_in_one_line_also_on_assignment(stories_path):
    config = EmbedderConfig(backbone="x")
    with pytest.raises(ValueError, match=r"^Unknown pooling 'max'; valid: mean, weighted_mean, last, eos, first"):
        config.pooling = "max"
    assert config.pooling == "mean"
    with pytest.raises(ValueError, match=r"^max_length must be at least 2, got 0\.$"):
        config.max_length = 0
    with pytest.raises(ValueError, match=r"^EmbedderConfig setting 'max_length': Input should be a valid integer"):
        EmbedderConfig(backbone="x", max_length="64")
    with pytest.raises(ValueError, match=r"^Unknown EmbedderConfig keys \['colour'\]; valid: \["):
        EmbedderConfig.from_dict({"backbone": "x", "colour": "red"})


# -- issue 15 defects ---------------------------------------------------------------------------------------------
def test_open_model_refuses_an_untrained_pooler_on_a_plain_backbone(stories_path):
    from embedkit.embedder import open_model  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"^pooling='latent_attention' on .*stories260K would be a new, untrained "
                                         r"pooler \(random vectors that change every run\): open a saved embedder"):
        open_model(stories_path, pooling="latent_attention", dtype="float32")
    with pytest.raises(ValueError, match=r"^max_length must be at least 2, got 0\.$"):
        open_model(stories_path, max_length=0, dtype="float32")


def test_pad_id_outside_the_embedding_matrix_pads_with_a_valid_id(stories_path):
    embedder = Embedder.from_pretrained(stories_path, dtype="float32")
    rows = embedder.backbone.get_input_embeddings().weight.shape[0]
    embedder.tokenizer.add_special_tokens({"pad_token": "<new-pad>"})  # added without resizing the model
    assert embedder.tokenizer.pad_token_id >= rows
    alone = np.stack([embedder.encode([t])[0] for t in TEXTS])
    for side in ("left", "right"):
        np.testing.assert_allclose(embedder.encode(TEXTS, padding_side=side), alone, atol=1e-5)


def test_a_method_registered_outside_the_package_is_saved_and_reinstalled(stories_path, tmp_path, monkeypatch):
    from embedkit import method_registry  # noqa: PLC0415

    monkeypatch.setattr(method_registry, "METHODS", dict(method_registry.METHODS))
    calls = []

    @method_registry.register_method("toy_scale")
    def apply(embedder, settings):
        calls.append(settings)
        embedder.forward_hook = lambda e, ids, mask: e.backbone(input_ids=ids, attention_mask=mask)[0] * 2.0
        return {"factor": 2.0}

    embedder = Embedder.from_pretrained(stories_path, dtype="float32", normalize=False)
    plain = embedder.encode(TEXTS)
    method_registry.enable_method(embedder, "toy_scale")
    np.testing.assert_allclose(embedder.encode(TEXTS), 2 * plain, atol=1e-5)
    loaded = Embedder.load(embedder.save(tmp_path / "toy"))
    assert loaded.config.methods == {"toy_scale": {"factor": 2.0}} and calls[-1] == {"factor": 2.0}
    np.testing.assert_allclose(loaded.encode(TEXTS), 2 * plain, atol=1e-5)
    with pytest.raises(ValueError, match=r"Unknown method 'nope' in the embedder config; known: \["):
        method_registry.enable_method(loaded, "nope")
