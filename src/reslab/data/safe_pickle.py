"""A restricted unpickler for the CIFAR "python version" batch files.

The batches are pickles, and a pickle can name any importable callable. This unpickler resolves only the
globals that the official format needs to rebuild a numpy array (plus the codec helper that Python 3 uses
for protocol-2 byte strings, and bytes itself); anything else — os.system, builtins.eval, subprocess.Popen — is refused
before it can be called, so a malicious file in a data folder cannot run code.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from ..errors import ReslabError


def _numpy_reconstruct():
    try:  # numpy >= 2 moved the implementation to numpy._core; old pickles still name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _codecs_encode(obj, encoding="latin1"):
    import codecs
    return codecs.encode(obj, encoding)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _codecs_encode,
    # Python 3 writing protocol 2 names builtins by their Python 2 module (fix_imports)
    ("__builtin__", "bytes"): lambda: bytes,
    ("builtins", "bytes"): lambda: bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch file")
        return factory()


def load_batch(path) -> dict:
    """Read one CIFAR batch file into a dict with str keys; any problem names the file."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise ReslabError(f"{path}: not a valid CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ReslabError(f"{path}: not a valid CIFAR batch file (top level is {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
