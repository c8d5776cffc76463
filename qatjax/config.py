"""``QatConfig``: what a quantized layer does, as a frozen, hashable dataclass.

A config is static: it can be a Flax module attribute and a ``jax.jit`` static
argument. Load one from a dict or a YAML file with :meth:`QatConfig.from_dict` /
:meth:`QatConfig.from_yaml`; unknown keys and bad values raise a ValueError that
names them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import yaml

from qatjax.fake_quant import STE_NAMES
from qatjax.calibration.aligned_histogram import MAX_NUM_BINS
from qatjax.formats import BlockFormat, Format, as_format
from qatjax.fp8 import Fp8Quantizer
from qatjax.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QatConfig", "GRANULARITIES", "OBSERVERS", "ESTIMATORS", "FP8_SCALINGS"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
OBSERVERS = ("minmax", "moving_average_minmax", "histogram")
ESTIMATORS = ("minmax", "percentile", "entropy", "mse")
ACTIVATION_SCALINGS = ("static", "dynamic")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
FP8_SCALINGS = ("current", "delayed")
AMAX_ALGOS = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class QatConfig:
    """Quantization recipe of a layer.

    Block-scaled formats (``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e2m3"``,
    ``"mxfp6_e3m2"``, ``"mxfp4"``, ``"mxint8"``, ``"nvfp4"``, see
    :class:`qatjax.BlockFormat`) block the operand along its contraction axis and take
    their scales from each block: a block ``weight_format`` ignores the granularity (refusing
    ``"per_group"``: its blocks are the groups); a block ``activation_format`` is always
    dynamic (``activation_scaling`` becomes ``"dynamic"``, no calibration). Both must be
    symmetric; they exclude ``learnable_scales``, ``fp8_scaling``, ``original_residuals``,
    ``ste="lsq"`` and per-token activations (blocks are finer). With MXFP8 weights and
    activations, ``fp8_grad_format`` (E5M2 by default) quantizes the output gradient to MXFP8
    in the backward pass (:attr:`block_grad_format`).

    Attributes:
      weight_format: format of the kernel (``None``: float kernel). Strings such as
        ``"int8"``, ``"fp8_e4m3"`` or ``"mxfp4"`` are accepted and converted.
      activation_format: format of the layer input (``None``: weight-only quantization).
      weight_granularity: ``"per_tensor"``, ``"per_channel"`` (one scale per output
        feature) or ``"per_group"`` (blocks of ``weight_group_size`` input features,
        per output feature).
      weight_group_size: block size along the contraction axis for ``"per_group"``.
      weight_symmetric: symmetric (zero point 0) or affine weights. Unsigned formats
        (``uint8``, ``uint4``) need affine (``False``): with zero point 0 they cannot
        represent negative values, so a symmetric unsigned config is refused.
      activation_symmetric: symmetric or affine activations (the same rule).
      activation_scaling: ``"static"`` (scales from calibration, frozen in
        ``quant_params`` or learned with LSQ) or ``"dynamic"`` (from each batch: absmax,
        or min / max when ``activation_symmetric`` is False; no calibration needed).
      activation_granularity: ``"per_tensor"`` or, with dynamic scaling, ``"per_token"``
        (one scale per row of the input, ``[..., 1]``, as AQT and Qwix quantize
        activations; QatDense only).
      activation_observer: ``"minmax"``, ``"moving_average_minmax"`` or ``"histogram"``.
      activation_estimator: ``"minmax"``, ``"percentile"``, ``"entropy"`` or ``"mse"``
        (the last three need the histogram observer). The default, ``"mse"``, held on
        both models measured (``benchmarks/bench_minilm_recipes.py``): every estimator
        ties on the digits MLP, while on MiniLM-L6 (W8A8, all Dense layers and attention
        einsums) the mean cosine to float is 0.986 for mse, 0.988 percentile, 0.984
        minmax and 0.957 entropy, which clips the outlier features of the residual
        stream. mse minimises the quantization error itself, so unlike a fixed
        percentile it does not depend on the calibration set's size. Where the runtime
        allows it, dynamic per-token activations (``activation_scaling="dynamic"``,
        ``activation_granularity="per_token"``) are better still on transformers: 0.997.
      percentile: the percentile used by the ``"percentile"`` estimator.
      num_bins: histogram bins.
      ema_momentum: momentum of the moving-average observer (torch's ``averaging_constant``).
      ste: straight-through estimator, ``"identity"``, ``"clipped"`` or ``"lsq"``.
      learnable_scales: LSQ: scales (and affine zero points) live in ``params`` and are
        trained; implies ``ste="lsq"``.
      lsq_grad_scale: apply LSQ's gradient scale ``1/sqrt(N * qmax)``.
      original_residuals: the backward pass multiplies by the float input and kernel
        instead of their quantized values (``dx = (g @ kernel.T) * mask_x``,
        ``dw = (x.T @ g) * mask_w``): Qwix's default when only the forward pass is
        quantized. It skips dequantizing the codes (on XLA:CPU, which cannot fuse that
        into the backward's matmuls, a train step is 3-9% cheaper), but it keeps float
        residuals where the default keeps 1-byte codes, and it is not the gradient of
        the fake-quant forward that PyTorch's fake quantization and AQT compute (the
        default, False): 0.5-1% off it with int8 weights, 9% (dx) with int4. Needs two
        integer (or two fp8) operands and ``ste`` ``"clipped"`` or ``"identity"``.
      fp8_scaling: the fp8 training recipe (:mod:`qatjax.fp8`), for fp8 weights and
        activations with per-tensor scales: ``"current"`` (amax of the tensor now) or
        ``"delayed"`` (amax history in the ``fp8_meta`` collection, Transformer Engine
        style). ``None`` (default): fp8 operands use the ordinary static / dynamic scales.
      fp8_grad_format: with ``fp8_scaling``, the format of the output gradient in the
        backward pass (``"fp8_e5m2"``), or ``None`` to keep gradients in float. With MXFP8
        weight and activation formats, the element format of the MXFP8 output gradient
        (blocks of 32 along each backward contraction; None: float gradients).
      amax_history_len: length of the delayed-scaling amax history.
      amax_compute_algo: ``"max"`` (max of the history) or ``"most_recent"``.
      fp8_margin: delayed scaling margin ``m``: ``scale = amax / fp8_max * 2**m``.
    """

    weight_format: Format | None = "int8"
    activation_format: Format | None = "int8"
    weight_granularity: str = "per_channel"
    weight_group_size: int | None = None
    weight_symmetric: bool = True
    activation_symmetric: bool = True
    activation_scaling: str = "static"
    activation_granularity: str = "per_tensor"
    activation_observer: str = "histogram"
    activation_estimator: str = "mse"
    percentile: float = 99.99
    num_bins: int = 2048
    ema_momentum: float = 0.01
    ste: str = "clipped"
    learnable_scales: bool = False
    lsq_grad_scale: bool = True
    original_residuals: bool = False
    fp8_scaling: str | None = None
    fp8_grad_format: Format | None = "fp8_e5m2"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    fp8_margin: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_format", "activation_format", "fp8_grad_format"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_format(value, name))
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        if (self.activation_format is not None and self.activation_format.is_block
                and self.activation_scaling == "static"):
            # Block scales come from each block of the input itself.
            object.__setattr__(self, "activation_scaling", "dynamic")
        _check_choice("activation_scaling", self.activation_scaling, ACTIVATION_SCALINGS)
        _check_choice("activation_granularity", self.activation_granularity, ACTIVATION_GRANULARITIES)
        if self.activation_granularity == "per_token" and (
                self.activation_scaling != "dynamic" or self.fp8_scaling is not None):
            raise ValueError("QatConfig: activation_granularity='per_token' needs "
                             "activation_scaling='dynamic' (and no fp8_scaling).")
        _check_choice("activation_observer", self.activation_observer, OBSERVERS)
        _check_choice("activation_estimator", self.activation_estimator, ESTIMATORS)
        _check_choice("ste", self.ste, STE_NAMES)
        if self.fp8_scaling is not None:
            _check_choice("fp8_scaling", self.fp8_scaling, FP8_SCALINGS)
        _check_choice("amax_compute_algo", self.amax_compute_algo, AMAX_ALGOS)
        for name in ("weight_symmetric", "activation_symmetric", "learnable_scales",
                     "lsq_grad_scale", "original_residuals"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QatConfig: `{name}` must be true or false, got {getattr(self, name)!r}.")
        if self.weight_granularity == "per_group":
            if not isinstance(self.weight_group_size, int) or self.weight_group_size <= 0:
                raise ValueError(
                    "QatConfig: `weight_group_size` must be a positive int when "
                    f"weight_granularity='per_group', got {self.weight_group_size!r}."
                )
        elif self.weight_group_size is not None:
            raise ValueError("QatConfig: `weight_group_size` is only used with weight_granularity='per_group'.")
        if (self.activation_observer != "histogram"
                and self.activation_estimator in ("percentile", "entropy", "mse")):
            raise ValueError(
                f"QatConfig: activation_estimator={self.activation_estimator!r} needs "
                "activation_observer='histogram'."
            )
        for name, lo, hi in (("percentile", 0.0, 100.0), ("ema_momentum", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
                raise ValueError(f"QatConfig: `{name}` must be a number in ({lo:g}, {hi:g}], got {value!r}.")
        if (isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int)
                or not 16 <= self.num_bins <= MAX_NUM_BINS or self.num_bins & (self.num_bins - 1)):
            # The histogram observer doubles its range exactly: bins per side (half of them for
            # affine activations) must be a power of two.
            raise ValueError(f"QatConfig: `num_bins` must be a power of two in [16, {MAX_NUM_BINS}], "
                             f"got {self.num_bins!r}.")
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise ValueError(f"QatConfig: `amax_history_len` must be an int >= 1, got {self.amax_history_len!r}.")
        if not isinstance(self.fp8_margin, int):
            raise ValueError(f"QatConfig: `fp8_margin` must be an int, got {self.fp8_margin!r}.")
        if self.learnable_scales and self.ste != "lsq":
            object.__setattr__(self, "ste", "lsq")
        if self.learnable_scales and self.activation_format is not None and self.activation_scaling == "dynamic":
            raise ValueError("QatConfig: learnable_scales needs activation_scaling='static'.")
        if self.weight_format is None and self.activation_format is None:
            raise ValueError("QatConfig: at least one of `weight_format`, `activation_format` must be set.")
        self._check_block_formats()
        for name in ("weight_format", "activation_format"):
            fmt = getattr(self, name)
            symmetric = getattr(self, name.replace("format", "symmetric"))
            if fmt is not None and fmt.is_float and not symmetric:
                raise ValueError(f"QatConfig: fp8 `{name}` must be symmetric.")
            if fmt is not None and not fmt.is_float and not fmt.is_block and not fmt.signed and symmetric:
                # Symmetric unsigned codes have zero point 0: every negative value becomes 0.
                sym_name = name.replace("format", "symmetric")
                raise ValueError(
                    f"QatConfig: {name}={fmt.name!r} with {sym_name}=True cannot represent "
                    f"negative values (zero point 0 clips them all to 0); set {sym_name}=False "
                    f"(affine {fmt.name}) or use a signed format such as 'int{fmt.bits}'.")
        if self.fp8_grad_format is not None and not self.fp8_grad_format.is_float:
            raise ValueError("QatConfig: `fp8_grad_format` must be an fp8 format or None.")
        if self.fp8_scaling is not None:
            if not self.fp8_matmul:
                raise ValueError("QatConfig: `fp8_scaling` needs fp8 weight_format and activation_format.")
            if self.weight_granularity != "per_tensor":
                raise ValueError("QatConfig: `fp8_scaling` uses per-tensor scales; set "
                                 "weight_granularity='per_tensor'.")
            if self.learnable_scales:
                raise ValueError("QatConfig: `fp8_scaling` and `learnable_scales` exclude each other.")
        if self.original_residuals:
            if not (self.integer_matmul or self.fp8_matmul):
                raise ValueError("QatConfig: `original_residuals` needs two integer (or two fp8) "
                                 "operands: set both weight_format and activation_format.")
            if self.ste == "lsq":
                raise ValueError("QatConfig: `original_residuals` excludes ste='lsq' (learnable "
                                 "scales need the quantized operands in the backward pass).")
            if self.fp8_scaling is not None:
                raise ValueError("QatConfig: `original_residuals` does not apply with `fp8_scaling`, "
                                 "whose backward pass has its own fp8 operands.")

    def _check_block_formats(self) -> None:
        blocked = [name for name in ("weight_format", "activation_format")
                   if getattr(self, name) is not None and getattr(self, name).is_block]
        if not blocked:
            return
        what = ", ".join(f"{name}={getattr(self, name).name!r}" for name in blocked)
        if "weight_format" in blocked and self.weight_granularity == "per_group":
            raise ValueError(f"QatConfig: {what}: a block format's blocks are its groups; drop "
                             "weight_granularity='per_group' (and weight_group_size).")
        for name in blocked:
            if not getattr(self, name.replace("format", "symmetric")):
                raise ValueError(f"QatConfig: block format `{name}` must be symmetric.")
        if self.activation_granularity == "per_token":
            raise ValueError(f"QatConfig: {what}: block formats exclude activation_granularity="
                             "'per_token'.")
        for flag, bad in (("learnable_scales", self.learnable_scales),
                          ("fp8_scaling", self.fp8_scaling is not None),
                          ("original_residuals", self.original_residuals),
                          ("ste='lsq'", self.ste == "lsq")):
            if bad:
                raise ValueError(f"QatConfig: {what}: block formats exclude `{flag}` (their scales "
                                 "come from each block and are not learned).")

    @property
    def integer_matmul(self) -> bool:
        """True when both operands are integer formats: the forward runs int8 x int8 -> int32."""
        return (self.weight_format is not None and self.activation_format is not None
                and not self.weight_format.is_block and not self.activation_format.is_block
                and not self.weight_format.is_float and not self.activation_format.is_float)

    @property
    def fp8_matmul(self) -> bool:
        """True when both operands are fp8 formats: the forward runs an fp8 dot_general."""
        return (self.weight_format is not None and self.activation_format is not None
                and self.weight_format.is_float and self.activation_format.is_float)

    @property
    def block_grad_format(self) -> BlockFormat | None:
        """The output gradient's format in the backward pass of MXFP8 training: MXFP8 with
        ``fp8_grad_format``'s element (E5M2 by default) and the activation format's scale
        rounding, when both operand formats are MXFP8 and ``fp8_grad_format`` is set; else None."""
        w, x, g = self.weight_format, self.activation_format, self.fp8_grad_format
        mxfp8 = lambda f: (f is not None and f.is_block and f.scale_format == "e8m0"  # noqa: E731
                           and f.element in ("e4m3", "e5m2"))
        if g is None or not (mxfp8(w) and mxfp8(x)):
            return None
        return BlockFormat(g.variant, x.block_size, "e8m0", x.scale_rounding)

    def weight_quantizer(self) -> WeightQuantizer | None:
        """The weight recipe as an operand quantizer (None for float weights)."""
        if self.weight_format is None:
            return None
        group = self.weight_group_size if self.weight_granularity == "per_group" else None
        return WeightQuantizer(self.weight_format, self.weight_granularity, group,
                               self.weight_symmetric)

    def activation_quantizer(self) -> ActivationQuantizer | None:
        """The activation recipe as an operand quantizer (None for float activations)."""
        if self.activation_format is None:
            return None
        static = self.activation_scaling == "static" and self.fp8_scaling is None
        return ActivationQuantizer(
            self.activation_format, self.activation_symmetric,
            "static" if static else "dynamic", self.activation_granularity == "per_token",
            self.activation_observer, self.activation_estimator, float(self.percentile),
            self.num_bins, float(self.ema_momentum), self.learnable_scales)

    def fp8_quantizers(self) -> tuple[Fp8Quantizer, Fp8Quantizer] | None:
        """With ``fp8_scaling``: the fp8 recipe's (activation, weight) operand quantizers."""
        if self.fp8_scaling is None:
            return None
        return tuple(Fp8Quantizer(fmt, self.fp8_scaling, self.fp8_margin, self.amax_history_len,
                                  self.amax_compute_algo)
                     for fmt in (self.activation_format, self.weight_format))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (formats as names), the inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        for name in ("weight_format", "activation_format", "fp8_grad_format"):
            fmt = getattr(self, name)
            out[name] = None if fmt is None else fmt.name
        return out

    def replace(self, **changes: Any) -> "QatConfig":
        """A copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QatConfig":
        """Builds a config from a mapping; unknown keys raise a ValueError naming them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"QatConfig.from_dict expects a mapping, got {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"QatConfig: unknown key(s) {unknown}; known keys are {sorted(known)}."
            )
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "QatConfig":
        """Loads a config from a YAML file path (or YAML text containing a mapping).

        A top-level ``quant:`` mapping is used if present, so a recipe file can also
        carry other sections (for example ``train:`` for the examples).
        """
        text = str(path_or_text)
        if os.path.exists(text):
            with open(text, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        elif "\n" in text or ":" in text:
            data = yaml.safe_load(text)
        else:
            raise FileNotFoundError(f"QatConfig.from_yaml: no such file: {text!r}.")
        if isinstance(data, Mapping) and "quant" in data:
            data = data["quant"]
        if not data:
            # An empty file or a bare ``quant:`` would otherwise silently be the default W8A8.
            raise ValueError(f"QatConfig.from_yaml: {text if len(text) < 200 else 'the text'!r} holds no "
                             "recipe (an empty document or an empty `quant:` section); write the "
                             "fields, e.g. `quant: {weight_format: int8}`.")
        return cls.from_dict(data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"QatConfig: `{name}` must be one of {choices}, got {value!r}.")
