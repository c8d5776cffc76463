"""Nibble packing of <= 4-bit codes for export."""

import jax.numpy as jnp
import numpy as np
import pytest

from qatjax.packing import pack_nibbles, unpack_nibbles


@pytest.mark.parametrize("signed,lo,hi", [(True, -8, 7), (False, 0, 15), (True, -2, 1)])
@pytest.mark.parametrize("k", [1, 6, 7])
def test_pack_round_trip_and_layout(signed, lo, hi, k):
    rng = np.random.default_rng(k)
    codes = rng.integers(lo, hi + 1, size=(3, k)).astype(np.int8 if signed else np.uint8)
    packed = pack_nibbles(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, (k + 1) // 2)
    # Independent layout check: low nibble holds element 2i, high nibble element 2i+1.
    nib = codes.astype(np.int64) & 0xF
    nib = np.concatenate([nib, np.zeros((3, k % 2), np.int64)], axis=1)
    np.testing.assert_array_equal(np.asarray(packed), nib[:, 0::2] | (nib[:, 1::2] << 4))
    back = unpack_nibbles(packed, k, signed)
    assert back.dtype == codes.dtype
    np.testing.assert_array_equal(np.asarray(back), codes)


def test_pack_rejects_wide_dtypes():
    with pytest.raises(TypeError, match="codes"):
        pack_nibbles(jnp.zeros((2, 2), jnp.int32))
