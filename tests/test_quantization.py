"""embedkit.quantization: the codes equal sentence-transformers' quantize_embeddings; Matryoshka truncation."""

import numpy as np
import pytest

from embedkit.quantization import (
    bytes_per_vector,
    calibration_ranges,
    check_precision,
    dequantize,
    quantize,
    to_ubinary,
    truncate_dimensions,
)


def _vectors(rows=300, dim=37, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_codes_equal_sentence_transformers(quantize_embeddings, precision):
    vectors = _vectors()
    expected = quantize_embeddings(vectors, precision=precision)
    got = quantize(vectors, precision)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (300, 5)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_scalar_codes_equal_sentence_transformers_with_the_same_calibration(quantize_embeddings, precision):
    vectors, calibration = _vectors(seed=1), _vectors(rows=100, seed=2)
    ranges = calibration_ranges(calibration)
    expected = quantize_embeddings(vectors, precision=precision, calibration_embeddings=calibration)
    got = quantize(vectors, precision, ranges)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, quantize_embeddings(vectors, precision=precision, ranges=ranges))
    assert (got == (-128 if precision == "int8" else 0)).any()  # values below the sample's range clip


def test_dequantize_inverts_within_one_step_and_unpacks_bits():
    vectors = _vectors(seed=3)
    ranges = calibration_ranges(vectors)
    step = (ranges[1] - ranges[0]) / 255
    for precision in ("int8", "uint8"):
        back = dequantize(quantize(vectors, precision, ranges), precision, 37, ranges)
        assert np.all(back <= vectors + 1e-6) and np.all(vectors - back <= step + 1e-6)
    for precision in ("binary", "ubinary"):
        bits = dequantize(quantize(vectors, precision), precision, 37)
        np.testing.assert_array_equal(bits, (vectors > 0).astype(np.float32))
        np.testing.assert_array_equal(to_ubinary(quantize(vectors, precision), precision), quantize(vectors, "ubinary"))
    np.testing.assert_array_equal(dequantize(quantize(vectors, "float16"), "float16", 37),
                                  vectors.astype(np.float16).astype(np.float32))


def test_bytes_per_vector():
    assert [bytes_per_vector(p, 256) for p in ("float32", "float16", "int8", "uint8", "binary", "ubinary")] == \
        [1024, 512, 256, 256, 32, 32]
    assert bytes_per_vector("binary", 37) == 5


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"^precision must be one of float32, float16, int8, uint8, binary, "
                                         r"ubinary, got 'int4'\.$"):
        check_precision("int4")
    with pytest.raises(ValueError, match="needs calibration ranges"):
        quantize(_vectors(), "int8")
    with pytest.raises(ValueError, match="must be float"):
        quantize(np.ones((2, 3), dtype=np.int8), "binary")
    with pytest.raises(ValueError, match="at least 2 vectors"):
        calibration_ranges(np.ones((1, 3)))


def test_truncate_dimensions():
    vectors = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate_dimensions(vectors, 2), [[0.6, 0.8]], atol=1e-6)
    assert truncate_dimensions(vectors, 3) is vectors
    for bad in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match=rf"^dimensions must be between 1 and 3, got {bad!r}: "):
            truncate_dimensions(vectors, bad)
