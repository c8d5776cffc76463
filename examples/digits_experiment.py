"""The handwritten-digits experiment: float training, PTQ and QAT recipes, evaluation.

Example code, not part of the ``qatjax`` package: it lives in ``examples/`` of a source
checkout and needs the example dependencies (optax, scikit-learn, matplotlib, tqdm)::

    pip install -e ".[examples]"

It uses only qatjax's public API (``qatjax.*``, :class:`qatjax.flax.QatDense`).

scikit-learn's bundled 8x8 digits (1797 images, no download) with a fixed, seeded,
stratified train/test split; an MLP 64-256-256-10 built from
:class:`~qatjax.flax.QatDense`. The same module runs in every mode: ``"float"`` to
train the baseline, ``"calibrate"`` (through :func:`qatjax.calibrate`), ``"train"``
(fake quantization, for QAT and for evaluating PTQ) and ``"infer"`` (the integer /
fp8 serving path on :func:`qatjax.convert`'s variables).

Used by ``examples/qat_digits.py`` (the tutorial), the other examples, and the
``qatjax run`` command (which loads this file from the checkout)::

    import digits_experiment as digits   # with examples/ on sys.path

    data = digits.load_data()
    model, float_vars = digits.train_float(data)
    row = digits.run_recipe(QatConfig(activation_estimator="mse"), "ptq", float_vars, data)
    print(digits.format_table([digits.float_row(model, float_vars, data), row]))

Every step is deterministic for a given seed (CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import qatjax
from qatjax import QatConfig
from qatjax.flax import QatDense

__all__ = [
    "Data",
    "load_data",
    "DigitsMLP",
    "Settings",
    "FULL",
    "QUICK",
    "Recipe",
    "load_recipe",
    "check_config",
    "observes",
    "Metrics",
    "Result",
    "train",
    "train_float",
    "logits",
    "evaluate",
    "calibration_batches",
    "float_row",
    "collect_stats",
    "calibrate_from",
    "run_recipe",
    "tree_bytes",
    "layer_inputs",
    "input_threshold",
    "format_table",
    "plot_histogram",
    "plot_accuracy",
    "RECIPE_KINDS",
    "ESTIMATORS",
]

RECIPE_KINDS = ("ptq", "qat")
# The activation estimators (QatConfig.activation_estimator): minmax, percentile, entropy, mse.
ESTIMATORS = tuple(qatjax.calibration.METHODS)
# The float model never quantizes; a weight-only config creates no calibration state at init.
_FLOAT_CONFIG = QatConfig(activation_format=None)


# ---------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Data:
    """The split: ``x_*`` float32 ``[n, 64]`` in [0, 1] (pixel / 16), ``y_*`` int32 ``[n]``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int = 0, test_size: float = 0.3) -> Data:
    """scikit-learn's digits, split (stratified, seeded) into 1257 train / 540 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Data(x_tr, y_tr, x_te, y_te)


# ---------------------------------------------------------------------------- model
class DigitsMLP(nn.Module):
    """MLP ``64 -> 256 -> 256 -> 10`` (ReLU) of QatDense layers ``dense_0``, ``dense_1``, ``head``.

    ``mode`` is passed to every layer. Each layer's input is sown into the
    ``intermediates`` collection (as ``<layer>_input``) when that collection is mutable,
    which is how :func:`layer_inputs` reads activations for the histogram plot.
    """

    config: QatConfig = _FLOAT_CONFIG
    hidden: Sequence[int] = (256, 256)
    num_classes: int = 10
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mode: str | None = None) -> jax.Array:
        names = [f"dense_{i}" for i in range(len(self.hidden))] + ["head"]
        sizes = list(self.hidden) + [self.num_classes]
        for i, (name, features) in enumerate(zip(names, sizes)):
            self.sow("intermediates", f"{name}_input", x)
            x = QatDense(features, config=self.config, axis_name=self.axis_name, name=name)(x, mode=mode)
            if i < len(sizes) - 1:
                x = nn.relu(x)
        return x


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """Training and calibration budget.

    Attributes:
      float_epochs / qat_epochs: passes over the training set (QAT starts from the float model).
      batch_size: training batch size (the last partial batch of an epoch is dropped).
      float_lr / qat_lr: Adam learning rates.
      calib_samples: training images used for calibration (``None``: all of them).
      calib_batch_size: calibration batch size.
      seed: parameter initialisation and shuffling.
    """

    float_epochs: int = 40
    qat_epochs: int = 5
    batch_size: int = 32
    float_lr: float = 1e-3
    qat_lr: float = 1e-4
    calib_samples: int | None = None
    calib_batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        def check(name, ok, expected):
            value = getattr(self, name)
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"Settings: `{name}` must be {expected}, got {value!r}.")

        def is_int(v):
            return isinstance(v, (int, np.integer))

        for name in ("float_epochs", "qat_epochs", "seed"):
            check(name, lambda v: is_int(v) and v >= 0, "an int >= 0")
        for name in ("batch_size", "calib_batch_size"):
            check(name, lambda v: is_int(v) and v >= 1, "an int >= 1")
        for name in ("float_lr", "qat_lr"):
            check(name, lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
        check("calib_samples", lambda v: v is None or (is_int(v) and v >= 1), "null or an int >= 1")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


FULL = Settings()
QUICK = Settings(float_epochs=15, qat_epochs=2, calib_samples=512)


# ---------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe file (``configs/*.yaml``): ``recipe: ptq|qat``, ``description:``, ``quant:``
    (a :class:`~qatjax.QatConfig`) and optionally ``train:`` (overrides of :class:`Settings`,
    e.g. ``qat_epochs``)."""

    name: str
    kind: str
    config: QatConfig
    description: str = ""
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_RECIPE_KEYS = ("recipe", "description", "quant", "train")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Reads and validates a recipe file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not YAML, not a mapping, unknown keys, bad ``recipe`` kind or bad
        ``quant`` / ``train`` values (the message names them).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such recipe file: {path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a recipe must be a YAML mapping with keys {list(_RECIPE_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in _RECIPE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known keys are {list(_RECIPE_KEYS)}")
    kind = data.get("recipe")
    if kind not in RECIPE_KINDS:
        raise ValueError(f"{path}: `recipe` must be one of {list(RECIPE_KINDS)}, got {kind!r}")
    quant = data.get("quant")
    if not isinstance(quant, Mapping):
        raise ValueError(f"{path}: `quant` must be a mapping of QatConfig fields, got {quant!r}")
    try:
        config = QatConfig.from_dict(quant)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if kind == "ptq" and config.fp8_scaling == "delayed":
        raise ValueError(f"{path}: fp8_scaling='delayed' learns its scales during training; "
                         "use `recipe: qat` (or fp8_scaling: current)")
    train_overrides = data.get("train") or {}
    if not isinstance(train_overrides, Mapping):
        raise ValueError(f"{path}: `train` must be a mapping of Settings fields, got {train_overrides!r}")
    known = {f.name for f in dataclasses.fields(Settings)}
    bad = sorted(set(train_overrides) - known)
    if bad:
        raise ValueError(f"{path}: unknown `train` key(s) {bad}; known keys are {sorted(known)}")
    try:
        FULL.replace(**train_overrides)
    except ValueError as e:
        raise ValueError(f"{path}: `train`: {e}") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return Recipe(name, kind, config, str(data.get("description") or ""), dict(train_overrides))


def check_config(config: QatConfig, num_features: int = 64) -> None:
    """Traces ``DigitsMLP(config)`` on abstract values (``jax.eval_shape``: no data, no
    compilation) through init, calibrate, train and infer mode, so that a config the model
    cannot run (e.g. a group size that does not divide 64 and 256) fails in a fraction of
    a second, before any training, with the layer's error.

    Train and infer are traced with dynamic activation scales standing in for calibrated
    ones (and plain scales for LSQ's learned ones): the same operand shapes and formats.
    """
    stand_in = config
    if observes(config):
        stand_in = config.replace(activation_scaling="dynamic", learnable_scales=False,
                                  ste="clipped" if config.ste == "lsq" else config.ste)

    def trace(x):
        model = DigitsMLP(config=config)
        variables = model.init(jax.random.key(0), x, mode="float")
        model.apply(variables, x, mode="calibrate", mutable=True)
        model = DigitsMLP(config=stand_in)
        variables = model.init(jax.random.key(0), x, mode="float")
        return [model.apply(variables, x, mode=m, mutable=True) for m in ("train", "infer")]

    jax.eval_shape(trace, jax.ShapeDtypeStruct((2, num_features), jnp.float32))


def observes(config: QatConfig) -> bool:
    """Whether ``config``'s layers calibrate their activations (static scales from an observer;
    not dynamic scaling, weight-only, or the fp8 scaling recipe)."""
    return (config.activation_format is not None and config.activation_scaling == "static"
            and config.fp8_scaling is None)


# ---------------------------------------------------------------------------- training
def _epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    perm = rng.permutation(n)
    for i in range(n // batch_size):
        yield perm[i * batch_size:(i + 1) * batch_size]


# Collections that train mode updates (delayed fp8 scaling's amax histories).
_TRAIN_STATE = ("fp8_meta",)


@functools.partial(jax.jit, static_argnames=("model", "mode", "tx"))
def _train_step(model, mode, tx, params, other, opt_state, x, y):
    mutable = [c for c in _TRAIN_STATE if c in other]

    def loss_fn(p):
        out, state = model.apply({"params": p, **other}, x, mode=mode, mutable=mutable)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**other, **state}, opt_state, loss


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimizer object per learning rate: ``_train_step`` takes it as a static argument,
    so every ``train`` with the same model, mode and rate reuses one compiled step."""
    return optax.adam(learning_rate)


def train(model: nn.Module, variables: Mapping[str, Any], data: Data, *, mode: str, epochs: int,
          learning_rate: float, batch_size: int = 32, seed: int = 0, progress: bool = False,
          desc: str = "train") -> dict:
    """Adam on ``params`` (cross-entropy, ``model.apply(..., mode=mode)``); ``fp8_meta`` (delayed
    fp8 scaling) is updated every step, other collections (``quant_params``,
    ``quant_stats``) are carried unchanged. Returns new variables."""
    from tqdm.auto import tqdm

    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    if getattr(model, "config", None) is not None and model.config.fp8_scaling == "delayed" \
            and mode == "train":
        other.setdefault("fp8_meta", {})  # created by the first step
    tx = _adam(learning_rate)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        losses = []
        for idx in _epoch_batches(len(data.x_train), batch_size, rng):
            params, other, opt_state, loss = _train_step(model, mode, tx, params, other, opt_state,
                                                         data.x_train[idx], data.y_train[idx])
            losses.append(loss)
        bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.4f}")
    return {"params": params, **other}


def train_float(data: Data, settings: Settings = FULL, *, progress: bool = False
                ) -> tuple[DigitsMLP, dict]:
    """Trains the float MLP (QatDense layers in ``mode="float"``): ``(model, {"params": ...})``."""
    model = DigitsMLP()
    params = model.init(jax.random.key(settings.seed), data.x_train[:1], mode="float")["params"]
    variables = train(model, {"params": params}, data, mode="float", epochs=settings.float_epochs,
                      learning_rate=settings.float_lr, batch_size=settings.batch_size,
                      seed=settings.seed, progress=progress, desc="train float")
    return model, variables


# ---------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnames=("model", "mode"))
def _logits(model, variables, x, mode):
    # Delayed fp8 scaling updates its history in train mode; evaluation discards the update.
    out, _ = model.apply(variables, x, mode=mode, mutable=[c for c in _TRAIN_STATE if c in variables])
    return out


def logits(model: nn.Module, variables: Mapping[str, Any], x: np.ndarray, mode: str) -> np.ndarray:
    """``model.apply(variables, x, mode=mode)`` (jitted) as a float32 numpy array."""
    return np.asarray(_logits(model, dict(variables), x, mode), np.float32)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Accuracy and, against the float model's logits on the same images, top-1 agreement
    and relative logit error ``||logits - logits_f||_F / ||logits_f||_F`` (fractions)."""

    accuracy: float
    agreement: float
    rel_logit_error: float


def evaluate(out: np.ndarray, labels: np.ndarray, float_logits: np.ndarray | None = None) -> Metrics:
    """Metrics of logits ``out [n, classes]`` (agreement 1 and error 0 without ``float_logits``)."""
    pred = np.argmax(out, axis=-1)
    acc = float(np.mean(pred == labels))
    if float_logits is None:
        return Metrics(acc, 1.0, 0.0)
    agree = float(np.mean(pred == np.argmax(float_logits, axis=-1)))
    err = float(np.linalg.norm(out.astype(np.float64) - float_logits)
                / np.linalg.norm(float_logits.astype(np.float64)))
    return Metrics(acc, agree, err)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays of a pytree."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def calibration_batches(data: Data, settings: Settings) -> list[np.ndarray]:
    """The first ``calib_samples`` training images (the split is already shuffled), in batches."""
    n = len(data.x_train) if settings.calib_samples is None else min(settings.calib_samples,
                                                                       len(data.x_train))
    b = settings.calib_batch_size
    return [data.x_train[i:i + b] for i in range(0, n, b)]


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass
class Result:
    """One row of the table.

    Attributes:
      name / kind / description: the recipe (kind ``"float"``, ``"ptq"`` or ``"qat"``).
      metrics: on the test set, from the serving path (``mode="infer"`` on converted variables).
      float_accuracy: the float model's test accuracy, for the difference column.
      float_bytes: bytes of the float ``params``.
      bytes: bytes of :func:`qatjax.quantize_model_weights` (int4 packed two per byte).
      infer_vs_train: ``max |infer(convert(v)) - train(v)|`` over the test logits.
      seconds: wall time of the recipe (calibration, training, evaluation, compilation).
      config: the QatConfig (None for the float row).
      variables: the calibrated / trained variables (not converted; ``quant_stats`` kept).
    """

    name: str
    kind: str
    description: str
    metrics: Metrics
    float_accuracy: float
    float_bytes: int
    bytes: int
    infer_vs_train: float | None
    seconds: float
    config: QatConfig | None = None
    variables: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    @property
    def delta(self) -> float:
        """Accuracy minus float accuracy (fraction)."""
        return self.metrics.accuracy - self.float_accuracy


def float_row(model: nn.Module, variables: Mapping[str, Any], data: Data) -> Result:
    """The float baseline's row."""
    out = logits(model, variables, data.x_test, "float")
    m = evaluate(out, data.y_test)
    size = tree_bytes(variables["params"])
    return Result("float", "float", "float32 baseline", m, m.accuracy, size, size, None, 0.0,
                  None, dict(variables))


def collect_stats(config: QatConfig, float_variables: Mapping[str, Any], data: Data,
                  settings: Settings = FULL, *, progress: bool = False) -> dict:
    """One calibration pass over the calibration images: the ``quant_stats`` (observer states)
    of ``config``'s activation observer, to share between recipes that differ only in the
    estimator or the weight format (see :func:`calibrate_from`)."""
    cheap = config.replace(activation_estimator="minmax")  # same observer; its finalize is cheap
    variables = qatjax.calibrate(DigitsMLP(config=cheap), {"params": float_variables["params"]},
                                 calibration_batches(data, settings), progress=progress)
    return variables.get("quant_stats", {})


def calibrate_from(config: QatConfig, float_variables: Mapping[str, Any], data: Data,
                   settings: Settings = FULL, *, stats: Mapping[str, Any] | None = None,
                   progress: bool = False) -> dict:
    """Calibrated variables of ``DigitsMLP(config)`` from the float checkpoint.

    Without ``stats``: :func:`qatjax.calibrate` over :func:`calibration_batches`. With
    ``stats`` (from :func:`collect_stats` with the same observer): only the estimators run,
    :func:`qatjax.finalize`, so every estimator sees exactly the same histogram. Configs
    without static activation scales have nothing to observe: finalize alone writes the
    layer descriptors and (LSQ) initialises the weight scales from the trained kernel.
    """
    model = DigitsMLP(config=config)
    variables = {"params": float_variables["params"]}
    sample = data.x_train[:1]  # finalize only traces the model with it
    if not observes(config):
        return qatjax.finalize(model, variables, sample)
    if stats is None:
        return qatjax.calibrate(model, variables, calibration_batches(data, settings), progress=progress)
    return qatjax.finalize(model, {**variables, "quant_stats": stats}, sample)


def run_recipe(config: QatConfig, kind: str, float_variables: Mapping[str, Any], data: Data, *,
               name: str | None = None, description: str = "", settings: Settings = FULL,
               stats: Mapping[str, Any] | None = None, progress: bool = False,
               float_logits: np.ndarray | None = None) -> Result:
    """Runs one recipe from the float checkpoint and evaluates it.

    * ``"ptq"``: calibrate on (a subset of) the training set (:func:`calibrate_from`;
      ``stats`` reuses the observer states of an earlier pass).
    * ``"qat"``: calibrate the same way (this also initialises LSQ scales from the
      trained kernel), then fine-tune in ``mode="train"`` with Adam.

    The result is evaluated on the serving path: ``mode="infer"`` on
    :func:`qatjax.convert`'s variables, compared with train mode (fake quantization,
    ``infer_vs_train``) and with the float model's logits.
    """
    if kind not in RECIPE_KINDS:
        raise ValueError(f"run_recipe: `kind` must be one of {RECIPE_KINDS}, got {kind!r}.")
    if not isinstance(config, QatConfig):
        raise TypeError(f"run_recipe: `config` must be a QatConfig, got {type(config).__name__}.")
    start = time.perf_counter()
    if float_logits is None:
        float_logits = logits(DigitsMLP(), float_variables, data.x_test, "float")
    float_acc = evaluate(float_logits, data.y_test).accuracy
    model = DigitsMLP(config=config)
    variables = calibrate_from(config, float_variables, data, settings, stats=stats, progress=progress)
    if kind == "qat":
        variables = train(model, variables, data, mode="train", epochs=settings.qat_epochs,
                          learning_rate=settings.qat_lr, batch_size=settings.batch_size,
                          seed=settings.seed + 1, progress=progress, desc=name or "QAT")
    served = qatjax.convert(variables)
    out_infer = logits(model, served, data.x_test, "infer")
    out_train = logits(model, variables, data.x_test, "train")
    metrics = evaluate(out_infer, data.y_test, float_logits)
    return Result(
        name=name or _default_name(config, kind), kind=kind, description=description,
        metrics=metrics, float_accuracy=float_acc,
        float_bytes=tree_bytes(float_variables["params"]),
        bytes=tree_bytes(qatjax.quantize_model_weights(variables)),
        infer_vs_train=float(np.max(np.abs(out_infer - out_train))),
        seconds=time.perf_counter() - start, config=config, variables=variables)


def _default_name(config: QatConfig, kind: str) -> str:
    w = "f" if config.weight_format is None else config.weight_format.name
    a = "f" if config.activation_format is None else config.activation_format.name
    est = config.activation_estimator if observes(config) else (
        config.fp8_scaling or config.activation_scaling if config.activation_format else "")
    return f"{kind} W:{w} A:{a} {est}"


def format_table(rows: Sequence[Result]) -> str:
    """A plain-text table: recipe, accuracy, difference to float (points), top-1 agreement with
    float, relative logit error, size (bytes, and the ratio to float), max |infer - train|."""
    head = ("config", "acc %", "vs float", "top-1 agree %", "rel logit err", "bytes",
            "x smaller", "|infer-train|")
    lines = [head]
    for r in rows:
        m = r.metrics
        lines.append((
            r.name, f"{100 * m.accuracy:.2f}", f"{100 * r.delta:+.2f}", f"{100 * m.agreement:.2f}",
            f"{m.rel_logit_error:.5f}", f"{r.bytes:,}", f"{r.float_bytes / r.bytes:.2f}",
            "-" if r.infer_vs_train is None else f"{r.infer_vs_train:.3g}"))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots
def layer_inputs(model: nn.Module, variables: Mapping[str, Any], x: np.ndarray, layer: str) -> np.ndarray:
    """The float model's input to ``layer`` (e.g. ``"dense_1"``) on ``x``, as a numpy array."""
    _, state = model.apply({"params": variables["params"]}, x, mode="float", mutable=["intermediates"])
    inter = state["intermediates"]
    key = f"{layer}_input"
    if key not in inter:
        raise ValueError(f"layer_inputs: no layer {layer!r}; layers are "
                         f"{sorted(k[:-len('_input')] for k in inter)}.")
    return np.asarray(inter[key][0])


def input_threshold(variables: Mapping[str, Any], layer: str) -> tuple[float, float]:
    """The calibrated real range ``(lo, hi)`` of ``layer``'s input (from :func:`qatjax.quant_report`):
    ``((qmin - zero_point) * scale, (qmax - zero_point) * scale)``."""
    rows = {r.path: r for r in qatjax.quant_report(variables).layers}
    if layer not in rows or rows[layer].input_scale is None:
        raise ValueError(f"input_threshold: layer {layer!r} has no calibrated input scale; "
                         f"layers: {sorted(rows)}.")
    r = rows[layer]
    fmt = qatjax.format_from_name(r.input_format)
    zp = r.input_zero_point or 0
    return (fmt.qmin - zp) * r.input_scale, (fmt.qmax - zp) * r.input_scale


def plot_histogram(values: np.ndarray, thresholds: Mapping[str, float], path: str, *,
                   title: str = "", bins: int = 256) -> str:
    """Histogram of ``|values|`` (log counts) with a vertical line per named threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.abs(np.asarray(values, np.float64).ravel())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(a, bins=bins, color="0.6", log=True, label=f"|x| ({a.size:,} values)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    for i, (label, t) in enumerate(thresholds.items()):
        ax.axvline(t, color=colors[i % len(colors)], linestyle=styles[i % len(styles)], lw=1.8,
                   label=f"{label}: {t:.3f}")
    ax.set_xlabel("activation magnitude")
    ax.set_ylabel("count (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(rows: Sequence[Result], path: str, *, title: str = "") -> str:
    """Two panels per config: test accuracy (bars, float as a line) and relative logit error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    acc = np.array([100 * r.accuracy for r in rows])
    err = np.array([r.metrics.rel_logit_error for r in rows])
    colors = ["0.4" if r.kind == "float" else ("tab:blue" if r.kind == "ptq" else "tab:orange")
              for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    pos = np.arange(len(rows))
    ax1.bar(pos, acc, color=colors)
    ax1.axhline(100 * rows[0].float_accuracy, color="k", lw=0.8, ls="--", label="float")
    ax1.set_ylim(max(0.0, acc.min() - 2.0), min(100.0, acc.max() + 0.8))
    for p, a in zip(pos, acc):
        ax1.text(p, a + 0.05, f"{a:.2f}", ha="center", va="bottom", fontsize=7)
    ax1.set_ylabel("test accuracy %")
    ax1.set_title(title or "digits MLP: accuracy and logit error per config "
                  "(grey float, blue PTQ, orange QAT)")
    ax1.legend(loc="lower left", fontsize=8)
    shown = np.where(err > 0, err, np.nan)
    ax2.bar(pos, shown, color=colors)
    ax2.set_yscale("log")
    if np.isfinite(shown).any():
        ax2.set_ylim(np.nanmin(shown) / 3, np.nanmax(shown) * 2.5)
    for p, e in zip(pos, err):
        if e > 0:
            ax2.text(p, e * 1.08, f"{e:.4f}", ha="center", va="bottom", fontsize=7)
    ax2.set_ylabel("relative logit error vs float")
    ax2.set_xticks(pos)
    ax2.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
