"""Saving and loading model variables, quantization state included.

``save`` writes every collection (``params``, ``quant_stats``, ``quant_params``,
fp8 scaling state...) with ``flax.serialization`` msgpack to one file, atomically
(a temporary file renamed into place) and never over an existing file unless asked,
so nothing a user saved is lost or half-written. ``load`` reads such a file, or an
orbax-checkpoint directory, back into a nested dict of arrays, bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import flax.serialization
import jax
import numpy as np

__all__ = ["save", "load"]


def save(path: str | os.PathLike, variables: Mapping[str, Any], *, overwrite: bool = False) -> str:
    """Writes ``variables`` (a pytree of arrays, e.g. a Flax variables dict) to ``path``.

    Args:
      path: destination file (conventionally ``*.msgpack``).
      variables: the pytree to save; arrays are fetched to host as they are (dtypes,
        including int8 / uint8 codes and fp8, are preserved).
      overwrite: replace an existing file; without it an existing file raises.
    Returns:
      The path written.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"save: {path!r} exists; pass overwrite=True to replace it.")
    state = flax.serialization.to_state_dict(jax.device_get(variables))
    data = flax.serialization.msgpack_serialize(state)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".qatjax-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(path: str | os.PathLike) -> dict:
    """Reads variables saved by :func:`save` (a file) or by orbax-checkpoint (a directory).

    Returns:
      A nested dict of numpy arrays.
    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a msgpack checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no such file or directory: {path!r}.")
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
        return jax.tree_util.tree_map(np.asarray, restored)
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several exception types on garbage
        raise ValueError(f"load: {path!r} is not a qatjax/flax msgpack checkpoint ({e}).") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"load: {path!r} does not hold a variables dict.")
    return state
