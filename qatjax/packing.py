"""Packing of narrow integer codes for export: two codes of 4 bits or fewer per byte."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pack_nibbles", "unpack_nibbles"]


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Packs int8 / uint8 codes in ``[-8, 15]`` two per byte along the last axis.

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i + 1`` to the high
    nibble (an odd length is padded with a zero code). Signed codes are stored in two's
    complement within their nibble.

    Args:
      codes: int8 or uint8 ``[..., K]``.
    Returns:
      uint8 ``[..., ceil(K / 2)]``.
    """
    if codes.dtype not in (jnp.int8, jnp.uint8):
        raise TypeError(f"pack_nibbles: `codes` must be int8 or uint8, got {codes.dtype}.")
    k = codes.shape[-1]
    nib = codes.astype(jnp.int32) & 0xF
    if k % 2:
        nib = jnp.concatenate([nib, jnp.zeros(nib.shape[:-1] + (1,), jnp.int32)], axis=-1)
    nib = nib.reshape(nib.shape[:-1] + (-1, 2))
    return (nib[..., 0] | (nib[..., 1] << 4)).astype(jnp.uint8)


def unpack_nibbles(packed: jax.Array, length: int, signed: bool) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., ceil(length/2)]`` -> codes ``[..., length]``
    (int8 with sign extension when ``signed``, else uint8)."""
    p = packed.astype(jnp.int32)
    nib = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1).reshape(p.shape[:-1] + (-1,))[..., :length]
    if signed:
        return jnp.where(nib >= 8, nib - 16, nib).astype(jnp.int8)
    return nib.astype(jnp.uint8)
