"""Saving and loading model variables, quantization state included.

``save`` writes every collection (``params``, ``quant_stats``, ``quant_params``,
fp8 scaling state...) with ``flax.serialization`` msgpack to one file, atomically
(a temporary file renamed into place) and never over an existing file unless asked,
so nothing a user saved is lost or half-written. ``load`` reads such a file, or an
orbax-checkpoint directory, back into a nested dict of arrays, bit for bit; given a
``target`` (e.g. the variables of a freshly initialised model, or ``{"params": ...,
"opt_state": ...}``) it restores the target's types as well -- observer states,
``nn.with_partitioning`` boxes, FrozenDicts, optax states -- so that calibration and
training resume where they stopped.

File layout (``CHECKPOINT_VERSION`` 2): a msgpack map ``{"__qatjax__": {"version": 2,
"sha256": <hex digest of the payload>}, "variables": <payload>}``, the payload being the
variables' ``flax.serialization`` msgpack bytes. ``load`` checks the digest, so a file
changed after it was written (a flipped bit, a truncated copy) raises instead of loading
other weights. Files of the earlier layouts still load: version 1 held the variables at
the top level next to ``"__qatjax__": {"version": 1}``, version 0 (no ``"__qatjax__"``
entry) the variables alone; neither carries a checksum. ``load`` never returns the
``"__qatjax__"`` entry.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import msgpack
import numpy as np

__all__ = ["CHECKPOINT_VERSION", "load", "save"]

# Version of the file layout ``save`` writes (files without the metadata entry: 0; see the
# module docstring).
CHECKPOINT_VERSION = 2
_META_KEY = "__qatjax__"
_CHECKSUM_KEY = "sha256"  # in the metadata entry: hex digest of the payload (version >= 2)
_PAYLOAD_KEY = "variables"  # next to the metadata entry: the variables' msgpack (version >= 2)


def save(path: str | os.PathLike, variables: Mapping[str, Any], *, overwrite: bool = False) -> str:
    """Writes ``variables`` (a pytree of arrays, e.g. a Flax variables dict) to ``path``,
    with a sha256 checksum that :func:`load` verifies, atomically (see the module docstring).

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
    if isinstance(state, Mapping) and _META_KEY in state:
        raise ValueError(f"save: {_META_KEY!r} is reserved for qatjax's checkpoint metadata.")
    payload = flax.serialization.msgpack_serialize(state)
    meta = {"version": CHECKPOINT_VERSION, _CHECKSUM_KEY: hashlib.sha256(payload).hexdigest()}
    _write_atomically(path, msgpack.packb({_META_KEY: meta, _PAYLOAD_KEY: payload}))
    return path


def _write_atomically(path: str, data: bytes) -> None:
    """Writes ``data`` to a new temporary file next to ``path`` (created with the
    permissions of any new file, i.e. the umask applies), flushes it to disk and renames it
    to ``path``: readers see the old file or the complete new one, never part of it. On any
    error or interrupt (``KeyboardInterrupt`` included) the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".qatjax-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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


def load(path: str | os.PathLike, target: Any = None) -> Any:
    """Reads variables saved by :func:`save` (a file) or by orbax-checkpoint (a directory).

    Args:
      path: the file or directory.
      target: optional pytree the checkpoint was saved from (or one of the same
        structure, e.g. a freshly initialised model's variables, or
        ``jax.eval_shape``'s abstract arrays). Its containers and types are restored
        with ``flax.serialization.from_state_dict``. Every entry of ``target`` must be
        in the file, with the same shape and dtype; entries of the file that a dict of
        ``target`` lacks (``quant_params/.../input_scale`` of a calibrated model loaded
        into an uncalibrated one's variables) are kept as loaded.
    Returns:
      Without ``target``, a nested dict of numpy arrays; with it, ``target``'s structure
      holding the loaded numpy arrays.
    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a msgpack checkpoint, is truncated or corrupted (its
        checksum does not match), was written by a newer qatjax, or does not match
        ``target`` (naming the first mismatching entry).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no such file or directory: {path!r}.")
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
        state = jax.tree_util.tree_map(np.asarray, restored)
    else:
        state = _read_file(path)
    if target is None:
        return state
    return _restore(target, flax.serialization.to_state_dict(state), (), path)


def _read_file(path: str) -> dict:
    """The variables of a checkpoint file of any version (see the module docstring), the
    payload's checksum verified where the file has one."""
    with open(path, "rb") as f:
        data = f.read()
    # The outer structure, parsed without decoding arrays: the envelope of a version 2 file,
    # or the variables of an older one (arrays as msgpack extension objects).
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data))
    unpacker.feed(data)
    try:
        top = unpacker.unpack()
    except msgpack.OutOfData:
        raise ValueError(f"load: {path!r} is truncated: the file ends ({len(data)} bytes) before "
                         "the checkpoint does (an interrupted copy or download?), or it is not a "
                         "qatjax checkpoint.") from None
    except Exception as e:  # noqa: BLE001 -- msgpack raises several exception types on garbage
        raise _not_a_checkpoint(path, e) from None
    if unpacker.tell() != len(data):
        raise ValueError(f"load: {path!r} is corrupted or not a qatjax checkpoint: "
                         f"{len(data) - unpacker.tell()} unexpected bytes after the checkpoint.")
    meta = top.get(_META_KEY) if isinstance(top, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    version = meta.get("version", 0)
    if not isinstance(version, int):  # a damaged file: a bad value, not a caller's bad type
        raise ValueError(  # noqa: TRY004
            f"load: {path!r} is corrupted: its checkpoint version is {version!r}, not a number.")
    if version > CHECKPOINT_VERSION:
        raise ValueError(
            f"load: {path!r} was written by a newer qatjax (checkpoint version {version}; "
            f"this one reads up to {CHECKPOINT_VERSION}); upgrade qatjax.")
    if _CHECKSUM_KEY in meta:
        payload = top.get(_PAYLOAD_KEY)
        if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != meta[_CHECKSUM_KEY]:
            raise ValueError(f"load: {path!r} is corrupted: its sha256 checksum does not match its "
                             "contents (the file changed after qatjax wrote it); nothing was "
                             "loaded.")
        data = payload
    try:
        state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 -- e.g. an extension type flax does not know
        raise _not_a_checkpoint(path, e) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"load: {path!r} does not hold a variables dict.")  # noqa: TRY004
    state = dict(state)
    state.pop(_META_KEY, None)  # version 1: the metadata entry next to the variables
    return state


def _not_a_checkpoint(path: str, error: Exception) -> ValueError:
    """The error for a file msgpack cannot parse (``error``: msgpack's or flax's)."""
    return ValueError(f"load: {path!r} is not a qatjax/flax msgpack checkpoint ({error}).")


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        keys = sorted(map(str, x))
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a subtree with keys [{shown}]"
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {np.dtype(x.dtype).name}"
    return f"a {type(x).__name__} ({x!r})"


def _mismatch(path: str, at: tuple[str, ...], expected: Any, found: Any) -> ValueError:
    where = "/".join(at) or "<root>"
    return ValueError(f"load: {path!r} does not match the target at {where}: expected "
                      f"{_describe(expected)}, found {_describe(found)}.")


def _check(expected: Any, found: Any, at: tuple[str, ...], path: str) -> None:
    """Raises at the first entry (in ``expected``'s order) where ``found`` differs from the
    target's state dict ``expected`` in structure, shape or dtype."""
    if isinstance(expected, Mapping):
        if not isinstance(found, Mapping):
            raise _mismatch(path, at, expected, found)
        for key, value in expected.items():
            if key not in found:
                where = "/".join(at + (key,))
                raise ValueError(f"load: {path!r} does not match the target at {where}: "
                                 f"expected {_describe(value)}, found no such entry.")
            _check(value, found[key], at + (key,), path)
        extra = [k for k in found if k not in expected]
        if extra:
            where = "/".join(at + (str(extra[0]),))
            raise ValueError(f"load: {path!r} does not match the target at {where}: the target "
                             f"has no such entry (expected only {_describe(expected)}).")
        return
    if isinstance(found, Mapping):
        raise _mismatch(path, at, expected, found)
    if expected is None:
        if found is not None:
            raise _mismatch(path, at, expected, found)
        return
    if hasattr(expected, "shape") and hasattr(expected, "dtype"):
        if not (hasattr(found, "shape") and hasattr(found, "dtype")):
            raise _mismatch(path, at, expected, found)
        if tuple(expected.shape) != tuple(found.shape) or np.dtype(expected.dtype) != np.dtype(found.dtype):
            raise _mismatch(path, at, expected, found)


def _restore(target: Any, state: Any, at: tuple[str, ...], path: str) -> Any:
    """``target``'s types around ``state``'s arrays. Dicts (and FrozenDicts) of the target
    keep the file's extra entries; anything else must match exactly."""
    if isinstance(target, Mapping) and isinstance(state, Mapping):
        out = {}
        for key, value in target.items():
            if str(key) not in state:
                where = "/".join(at + (str(key),))
                raise ValueError(f"load: {path!r} does not match the target at {where}: expected "
                                 f"{_describe(flax.serialization.to_state_dict(value))}, found no "
                                 "such entry.")
            out[key] = _restore(value, state[str(key)], at + (str(key),), path)
        known = {str(key) for key in target}
        out.update((key, value) for key, value in state.items() if key not in known)
        return flax.core.FrozenDict(out) if isinstance(target, flax.core.FrozenDict) else out
    _check(flax.serialization.to_state_dict(target), state, at, path)
    return flax.serialization.from_state_dict(target, state, name="/".join(at))
