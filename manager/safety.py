"""The one check every weights file passes before anything reads it: safetensors only, whole, never a pickle.

safetensors' own ``safe_open`` decides whether a file is valid. Only a file it
rejects is examined further, to tell the user *why*: a pickle or a zip archive
(``torch.save``) is recognised by its real signature, anything else is corrupt
or truncated. A valid safetensors file is therefore never refused, whatever its
first bytes (its header length) happen to be.
"""

from __future__ import annotations

import os

from .errors import ModelSourceError, UnsafeFileError

#: Suffixes of pickle-based checkpoint files; refused before they are opened.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
ZIP_MAGIC = b"PK\x03\x04"
# After PROTO (0x80, protocol 2..5) a pickle stream continues with FRAME (protocol 4+) or an opcode that starts
# an object: EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, MARK, GLOBAL, STACK_GLOBAL's SHORT_BINUNICODE, BINPUT, ...
_AFTER_PROTO = frozenset(b"\x95}])(c\x8cqX\x93NKJM\x8a")


def looks_like_pickle(path: str) -> bool:
    """True for a zip archive or a raw pickle stream (protocol 2-5), judged by the bytes, not the suffix."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if head.startswith(ZIP_MAGIC):
        return True
    return len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] in _AFTER_PROTO


def _pickle_error(path: str, why: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path!r} is {why}; TurboBooth loads only .safetensors weights, because "
        "pickle files can run arbitrary code when opened. Use the .safetensors version of this file."
    )


def check_safetensors(path: str, role: str = "weights") -> dict[str, str]:
    """Make sure ``path`` is a complete safetensors file; return its metadata.

    Raises UnsafeFileError for pickles and zip archives, ModelSourceError for a
    missing, empty, corrupt or truncated file. Reads the header only.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ModelSourceError(f"the {role} file {path!r} {what}; give the path of a .safetensors file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_error(path, f"a pickle-based checkpoint ({suffix})")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        if looks_like_pickle(path):
            raise _pickle_error(path, "a pickle or zip archive despite its name") from e
        size = os.path.getsize(path)
        raise ModelSourceError(
            f"{path!r} is corrupt or truncated ({size} bytes; {e}); it is not a complete safetensors file. "
            "Delete it and re-download it."
        ) from e


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a checked safetensors file (header only)."""
    from safetensors import safe_open

    check_safetensors(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())
