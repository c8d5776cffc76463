"""Number formats that qatjax quantizes to.

Two kinds exist:

* :class:`IntFormat` -- a ``bits``-bit integer grid (2 to 8 bits), signed or
  unsigned. Codes are stored as ``int8`` (signed) or ``uint8`` (unsigned) for
  every width; packing narrower codes is an export concern
  (:mod:`qatjax.flax.model`), not a compute one.
* :class:`FloatFormat` -- an OCP fp8 format, ``e4m3fn`` (max 448, no
  infinities) or ``e5m2`` (max 57344). Codes are stored in the matching
  ``jnp.float8_*`` dtype.

Formats are frozen, hashable dataclasses, so they can be static arguments of
``jax.jit`` and attributes of Flax modules.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "IntFormat",
    "FloatFormat",
    "Format",
    "int8",
    "uint8",
    "int4",
    "uint4",
    "fp8_e4m3",
    "fp8_e5m2",
    "format_from_name",
    "format_code",
    "format_from_code",
]


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A signed or unsigned integer grid of ``bits`` bits (2 <= bits <= 8).

    ``qmin, qmax = -2**(bits-1), 2**(bits-1) - 1`` when signed, ``0, 2**bits - 1``
    when unsigned.
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError(f"IntFormat: `bits` must be an int in [2, 8], got {self.bits!r}.")
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(
                f"IntFormat: `bits` must be in [2, 8] (codes are stored in 8 bits), got {self.bits}."
            )
        if not isinstance(self.signed, (bool, np.bool_)):
            raise TypeError(f"IntFormat: `signed` must be a bool, got {self.signed!r}.")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "signed", bool(self.signed))

    is_float = False

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> jnp.dtype:
        """``int8`` for signed formats, ``uint8`` for unsigned ones."""
        return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    def __repr__(self) -> str:
        return f"IntFormat(bits={self.bits}, signed={self.signed})"


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """An OCP fp8 format: ``"e4m3"`` (e4m3fn) or ``"e5m2"``.

    ``max`` is the largest finite value (448 or 57344); quantization saturates
    to ``[-max, max]`` before the round-to-nearest-even cast.
    """

    variant: str

    def __post_init__(self) -> None:
        if self.variant not in _FP8_DTYPES:
            raise ValueError(
                f"FloatFormat: `variant` must be one of {sorted(_FP8_DTYPES)}, got {self.variant!r}."
            )

    is_float = True
    signed = True

    @property
    def storage_dtype(self) -> jnp.dtype:
        """``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2``."""
        return jnp.dtype(_FP8_DTYPES[self.variant])

    @property
    def max(self) -> float:
        """Largest finite magnitude: 448.0 (e4m3) or 57344.0 (e5m2)."""
        return float(ml_dtypes.finfo(_FP8_DTYPES[self.variant]).max)

    @property
    def qmin(self) -> float:
        """``-max``: the lower saturation bound in code units."""
        return -self.max

    @property
    def qmax(self) -> float:
        """``max``: the upper saturation bound in code units."""
        return self.max

    @property
    def bits(self) -> int:
        return 8

    @property
    def name(self) -> str:
        return f"fp8_{self.variant}"

    def __repr__(self) -> str:
        return f"FloatFormat({self.variant!r})"


_FP8_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}

Format = Union[IntFormat, FloatFormat]

int8 = IntFormat(8, signed=True)
uint8 = IntFormat(8, signed=False)
int4 = IntFormat(4, signed=True)
uint4 = IntFormat(4, signed=False)
fp8_e4m3 = FloatFormat("e4m3")
fp8_e5m2 = FloatFormat("e5m2")


def format_from_name(name: str) -> Format:
    """Parses ``"int8"``, ``"uint4"``, ``"int3"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``...

    Raises:
      ValueError: naming the accepted spellings when ``name`` is not one.
    """
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, got {name!r}.")
    key = name.strip().lower()
    if key in ("fp8_e4m3", "e4m3", "fp8_e4m3fn", "e4m3fn"):
        return fp8_e4m3
    if key in ("fp8_e5m2", "e5m2"):
        return fp8_e5m2
    for prefix, signed in (("uint", False), ("int", True)):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return IntFormat(int(key[len(prefix):]), signed)
    raise ValueError(
        f"unknown format name {name!r}: expected 'int2'..'int8', 'uint2'..'uint8', "
        "'fp8_e4m3' or 'fp8_e5m2'."
    )


def as_format(fmt: object, argname: str = "fmt") -> Format:
    """Returns ``fmt`` if it is a format (or a format name); raises a TypeError otherwise."""
    if isinstance(fmt, (IntFormat, FloatFormat)):
        return fmt
    if isinstance(fmt, str):
        try:
            return format_from_name(fmt)
        except ValueError as e:
            raise ValueError(f"`{argname}`={fmt!r}: {e}") from None
    raise TypeError(
        f"`{argname}` must be a qatjax format (IntFormat, FloatFormat or a name such as "
        f"'int8'), got {fmt!r}."
    )


def format_code(fmt: Format | None) -> int:
    """A small int naming a format, so that variables can describe themselves.

    ``bits`` for signed integers, ``100 + bits`` for unsigned, 243 for fp8_e4m3,
    252 for fp8_e5m2, 0 for ``None`` (float).
    """
    if fmt is None:
        return 0
    if fmt.is_float:
        return 243 if fmt.variant == "e4m3" else 252
    return fmt.bits + (0 if fmt.signed else 100)


def format_from_code(code: int) -> Format | None:
    """Inverse of :func:`format_code`."""
    code = int(code)
    if code == 0:
        return None
    if code == 243:
        return fp8_e4m3
    if code == 252:
        return fp8_e5m2
    if 2 <= code <= 8:
        return IntFormat(code, True)
    if 102 <= code <= 108:
        return IntFormat(code - 100, False)
    raise ValueError(f"unknown format code {code}.")
