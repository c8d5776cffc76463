"""Number formats that qatjax quantizes to.

Two kinds exist:

* :class:`IntFormat` -- a ``bits``-bit integer grid (2 to 8 bits), signed or
  unsigned. Codes are stored as ``int8`` (signed) or ``uint8`` (unsigned) for
  every width; packing narrower codes is an export concern
  (:mod:`qatjax.flax.model`), not a compute one.
* :class:`FloatFormat` -- an OCP fp8 format, ``e4m3fn`` (max 448, no
  infinities) or ``e5m2`` (max 57344). Codes are stored in the matching
  ``jnp.float8_*`` dtype.
* :class:`BlockFormat` -- a block-scaled format (OCP Microscaling v1.0, and NVIDIA's
  NVFP4): blocks of ``block_size`` elements along one axis (the contraction axis) share
  one scale. MXFP8 (E4M3 / E5M2 elements), MXFP6 (E2M3 / E3M2), MXFP4 (E2M1) and
  MXINT8, blocks of 32 with an E8M0 (power-of-two) scale; NVFP4, E2M1 elements in blocks
  of 16 with an E4M3 block scale and a float32 per-tensor scale. The numerics live in
  :mod:`qatjax.blocks`.

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
    "BlockFormat",
    "Format",
    "SCALE_ROUNDINGS",
    "int8",
    "uint8",
    "int4",
    "uint4",
    "fp8_e4m3",
    "fp8_e5m2",
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp4",
    "mxint8",
    "nvfp4",
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
    is_block = False

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


class _SaturatingRange:
    """``qmin`` / ``qmax`` of a float-element format: the symmetric saturation bounds
    ``-max`` / ``max`` in code units (the subclass defines ``max``)."""

    max: float

    @property
    def qmin(self) -> float:
        """``-max``: the lower saturation bound in code units."""
        return -self.max

    @property
    def qmax(self) -> float:
        """``max``: the upper saturation bound in code units."""
        return self.max


@dataclasses.dataclass(frozen=True)
class FloatFormat(_SaturatingRange):
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
    is_block = False
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
    def bits(self) -> int:
        return 8

    @property
    def name(self) -> str:
        return f"fp8_{self.variant}"

    def __repr__(self) -> str:
        return f"FloatFormat({self.variant!r})"


#: Element formats of block formats: ml_dtypes name of the element, its largest value and
#: the exponent ``emax`` of its largest normal (MXINT8: two's complement with an implicit
#: ``2**-6``, values ``k / 64``).
_ELEMENTS = {
    "e4m3": ("float8_e4m3fn", 8),
    "e5m2": ("float8_e5m2", 15),
    "e2m3": ("float6_e2m3fn", 2),
    "e3m2": ("float6_e3m2fn", 4),
    "e2m1": ("float4_e2m1fn", 2),
    "int8": (None, 0),
}

#: How the shared E8M0 exponent of a block is rounded (see :class:`BlockFormat`).
SCALE_ROUNDINGS = ("floor", "ceil", "round_up_on_saturation")
_ROUNDING_SUFFIX = {"floor": "", "ceil": "_ceil", "round_up_on_saturation": "_rus"}
_BASE_NAMES = {("e4m3", "e8m0"): "mxfp8_e4m3", ("e5m2", "e8m0"): "mxfp8_e5m2",
               ("e2m3", "e8m0"): "mxfp6_e2m3", ("e3m2", "e8m0"): "mxfp6_e3m2",
               ("e2m1", "e8m0"): "mxfp4", ("int8", "e8m0"): "mxint8", ("e2m1", "e4m3"): "nvfp4"}
_DEFAULT_BLOCK = {"e8m0": 32, "e4m3": 16}


@dataclasses.dataclass(frozen=True)
class BlockFormat(_SaturatingRange):
    """A block-scaled format: ``x ~ element * scale`` with one scale per block of
    ``block_size`` consecutive elements along one axis (the caller's block axis, the
    contraction axis of a matmul).

    * ``scale_format="e8m0"`` (OCP MX v1.0): the scale is ``X = 2**e``, stored as the byte
      ``e + 127`` (E8M0; 255 is NaN), ``-127 <= e <= 127``.
    * ``scale_format="e4m3"`` (NVFP4): the scale is ``s_b * g``: an E4M3 block scale ``s_b``
      and a float32 per-tensor scale ``g``.

    Elements are ``v / scale`` rounded to nearest even and saturated to ``+-max`` (E4M3 448,
    E5M2 57344, E2M3 7.5, E3M2 28, E2M1 6, MXINT8 ``127/64``).

    ``scale_rounding`` picks the E8M0 exponent of a block with largest magnitude ``amax``;
    ``emax`` is the exponent of the element's largest normal (E4M3 8, E5M2 15, E2M3 2,
    E3M2 4, E2M1 2, INT8 0):

    * ``"floor"``: the OCP rule ``e = floor(log2(amax)) - emax``; values between the
      element's max and ``2**(emax+1) * X`` saturate. torchao's default
      (``ScaleCalculationMode.FLOOR``).
    * ``"ceil"``: the smallest ``e`` with ``amax / 2**e <= max``: nothing saturates.
      Transformer Engine (``float_to_e8m0(amax * (1/max))`` rounding toward +inf, its
      reciprocal rounded to float32 first), torchao's ``RCEIL``, Qwix
      (``2**ceil(log2(absmax / max))`` for ``mxfp8`` / ``mxfp4``) and NVIDIA Model
      Optimizer's MXFP4 (``ceil(log2(amax / 6))``) use this rule, up to those float
      roundings.
    * ``"round_up_on_saturation"``: the floor rule, plus one where the block's largest
      element would round (to nearest even, on the element's grid continued past its max)
      above the element's max. torchao's ``EVEN`` (amax rounded half-up to the element's
      mantissa, then floored) is the same rule except for E4M3, whose max (1.75 * 2**8)
      is not the binade's last grid point: torchao rounds up from 496 * X, this rule from
      464 * X (so torchao's EVEN saturates E4M3 values in (464, 496) * X).

    NVFP4's block scale is ``s_b = e4m3(amax / (6 * g))`` (round to nearest even,
    saturating; ``scale_rounding="nearest"``) with ``g = amax_tensor / (448 * 6)``, as
    Transformer Engine, Model Optimizer and torchao compute it.

    ``mse_search``: instead of the rule's scale, each block takes the one of three
    candidates -- the rule's scale code and its two neighbours (``e - 1, e, e + 1`` for
    E8M0; the adjacent E4M3 codes for NVFP4) -- with the smallest squared error of the
    block, the rule's on ties.

    Attributes:
      element: ``"e4m3"``, ``"e5m2"``, ``"e2m3"``, ``"e3m2"``, ``"e2m1"`` or ``"int8"``.
      block_size: elements per block (32 for MX, 16 for NVFP4).
      scale_format: ``"e8m0"`` or ``"e4m3"`` (NVFP4: E2M1 elements only).
      scale_rounding: one of :data:`SCALE_ROUNDINGS` for E8M0; ``"nearest"`` for E4M3.
      mse_search: per-block MSE choice among the rule's scale and its neighbours.

    Codes are stored one per byte: ``float8_e4m3fn`` / ``float8_e5m2`` for MXFP8, the
    element's bit pattern in a ``uint8`` for FP6 / FP4 (ml_dtypes' encoding: sign in bit
    5 or 3), ``int8`` for MXINT8 (``k`` for the value ``k / 64``). ``signed`` is True only
    for MXINT8 (two's complement codes); packing FP4 codes two per byte is an export
    concern (:mod:`qatjax.packing`).
    """

    element: str
    block_size: int | None = None
    scale_format: str = "e8m0"
    scale_rounding: str | None = None
    mse_search: bool = False

    def __post_init__(self) -> None:
        if self.element not in _ELEMENTS:
            raise ValueError(f"BlockFormat: `element` must be one of {sorted(_ELEMENTS)}, "
                             f"got {self.element!r}.")
        if self.scale_format not in _DEFAULT_BLOCK:
            raise ValueError(f"BlockFormat: `scale_format` must be 'e8m0' or 'e4m3', got "
                             f"{self.scale_format!r}.")
        if self.scale_format == "e4m3" and self.element != "e2m1":
            raise ValueError("BlockFormat: an E4M3 block scale (NVFP4) needs `element`='e2m1', "
                             f"got {self.element!r}.")
        bs = _DEFAULT_BLOCK[self.scale_format] if self.block_size is None else self.block_size
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 2:
            raise ValueError(f"BlockFormat: `block_size` must be an int >= 2, got {bs!r}.")
        object.__setattr__(self, "block_size", int(bs))
        rounding = self.scale_rounding
        if self.scale_format == "e4m3":
            if rounding not in (None, "nearest"):
                raise ValueError("BlockFormat: an E4M3 block scale rounds to nearest "
                                 f"(`scale_rounding`='nearest'), got {rounding!r}.")
            rounding = "nearest"
        elif rounding is None:
            rounding = "floor"
        elif rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"BlockFormat: `scale_rounding` must be one of {SCALE_ROUNDINGS}, "
                             f"got {rounding!r}.")
        object.__setattr__(self, "scale_rounding", rounding)
        if not isinstance(self.mse_search, (bool, np.bool_)):
            raise TypeError(f"BlockFormat: `mse_search` must be a bool, got {self.mse_search!r}.")
        object.__setattr__(self, "mse_search", bool(self.mse_search))

    is_float = False  # neither an integer grid nor a per-tensor fp8 format: see is_block
    is_block = True

    @property
    def element_dtype(self):
        """The ml_dtypes type of a float element (None for MXINT8)."""
        name = _ELEMENTS[self.element][0]
        return None if name is None else getattr(ml_dtypes, name)

    @property
    def emax(self) -> int:
        """Exponent of the element's largest normal (the OCP ``emax_elem``)."""
        return _ELEMENTS[self.element][1]

    @property
    def max(self) -> float:
        """Largest element magnitude (E2M1 6, E4M3 448, MXINT8 127/64...)."""
        if self.element == "int8":
            return 127.0 / 64.0
        return float(ml_dtypes.finfo(self.element_dtype).max)

    @property
    def bits(self) -> int:
        """Bits per element (8, 6 or 4)."""
        return 8 if self.element == "int8" else int(ml_dtypes.finfo(self.element_dtype).bits)

    @property
    def signed(self) -> bool:
        """Whether the codes are two's complement integers (MXINT8 only)."""
        return self.element == "int8"

    @property
    def storage_dtype(self) -> jnp.dtype:
        """``float8_e4m3fn`` / ``float8_e5m2`` (MXFP8), ``int8`` (MXINT8), else ``uint8``."""
        if self.element in ("e4m3", "e5m2"):
            return jnp.dtype(self.element_dtype)
        return jnp.dtype(jnp.int8 if self.element == "int8" else jnp.uint8)

    @property
    def scale_dtype(self) -> jnp.dtype:
        """Dtype of the stored block scales: ``uint8`` (E8M0 bytes) or ``float8_e4m3fn``."""
        return jnp.dtype(jnp.uint8 if self.scale_format == "e8m0" else jnp.float8_e4m3fn)

    @property
    def name(self) -> str:
        """``"mxfp4"``, ``"mxfp8_e4m3"``, ``"nvfp4"``..., with ``_b{n}`` for a non-default block
        size, ``_ceil`` / ``_rus`` for the rounding and ``_mse`` for the scale search."""
        name = _BASE_NAMES[(self.element, self.scale_format)]
        if self.block_size != _DEFAULT_BLOCK[self.scale_format]:
            name += f"_b{self.block_size}"
        name += _ROUNDING_SUFFIX.get(self.scale_rounding, "")
        return name + ("_mse" if self.mse_search else "")

    def __repr__(self) -> str:
        return f"BlockFormat({self.name!r})"


def _block_format_from_name(key: str) -> BlockFormat | None:
    """Parses the names :attr:`BlockFormat.name` writes (None if ``key`` is not one)."""
    mse = key.endswith("_mse")
    key = key[:-4] if mse else key
    rounding = None
    for r, suffix in _ROUNDING_SUFFIX.items():
        if suffix and key.endswith(suffix):
            key, rounding = key[:-len(suffix)], r
    block = None
    head, sep, tail = key.rpartition("_b")
    if sep and tail.isdigit():
        key, block = head, int(tail)
    for (element, scale_format), base in _BASE_NAMES.items():
        if key == base:
            try:
                return BlockFormat(element, block, scale_format, rounding, mse)
            except ValueError:
                return None
    return None


_FP8_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}

Format = Union[IntFormat, FloatFormat, BlockFormat]

int8 = IntFormat(8, signed=True)
uint8 = IntFormat(8, signed=False)
int4 = IntFormat(4, signed=True)
uint4 = IntFormat(4, signed=False)
fp8_e4m3 = FloatFormat("e4m3")
fp8_e5m2 = FloatFormat("e5m2")
mxfp8_e4m3 = BlockFormat("e4m3")
mxfp8_e5m2 = BlockFormat("e5m2")
mxfp6_e2m3 = BlockFormat("e2m3")
mxfp6_e3m2 = BlockFormat("e3m2")
mxfp4 = BlockFormat("e2m1")
mxint8 = BlockFormat("int8")
nvfp4 = BlockFormat("e2m1", scale_format="e4m3")


def format_from_name(name: str) -> Format:
    """Parses ``"int8"``, ``"uint4"``, ``"int3"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, and the block
    formats ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e2m3"``, ``"mxfp6_e3m2"``, ``"mxfp4"``,
    ``"mxint8"``, ``"nvfp4"`` (with the suffixes of :attr:`BlockFormat.name`: ``"mxfp4_ceil"``,
    ``"mxfp8_e4m3_rus"``, ``"mxfp4_b16_mse"``...).

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
    block = _block_format_from_name(key)
    if block is not None:
        return block
    raise ValueError(
        f"unknown format name {name!r}: expected 'int2'..'int8', 'uint2'..'uint8', "
        "'fp8_e4m3', 'fp8_e5m2', or a block format ('mxfp8_e4m3', 'mxfp8_e5m2', 'mxfp6_e2m3', "
        "'mxfp6_e3m2', 'mxfp4', 'mxint8', 'nvfp4', optionally with '_ceil' / '_rus', '_b<n>', "
        "'_mse')."
    )


def as_format(fmt: object, argname: str = "fmt") -> Format:
    """Returns ``fmt`` if it is a format (or a format name); raises a TypeError otherwise."""
    if isinstance(fmt, (IntFormat, FloatFormat, BlockFormat)):
        return fmt
    if isinstance(fmt, str):
        try:
            return format_from_name(fmt)
        except ValueError as e:
            raise ValueError(f"`{argname}`={fmt!r}: {e}") from None
    raise TypeError(
        f"`{argname}` must be a qatjax format (IntFormat, FloatFormat, BlockFormat or a name "
        f"such as 'int8'), got {fmt!r}."
    )


def format_code(fmt: Format | None) -> int:
    """A small int naming a format, so that variables can describe themselves.

    ``bits`` for signed integers, ``100 + bits`` for unsigned, 243 for fp8_e4m3,
    252 for fp8_e5m2, 0 for ``None`` (float).
    """
    if fmt is None:
        return 0
    if fmt.is_block:
        raise ValueError(f"format_code: block format {fmt.name} has no code (descriptors name "
                         "formats since version 1).")
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
