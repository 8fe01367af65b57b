"""Safe output names and atomic writes."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from .errors import InvalidInputError

_SAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_name(name: str, default: str = "turbobooth") -> str:
    """A file name without directories, traversal or odd characters ("../x/y" -> "x_y")."""
    if not isinstance(name, str):
        raise InvalidInputError(f"name must be text, got {name!r}")
    parts = [p for p in re.split(r"[\\/]+", name.strip()) if p not in ("", ".", "..")]
    cleaned = _SAFE.sub("_", "_".join(parts)).strip(" .")
    return cleaned[:120] or default


def unique_path(folder: str, stem: str, suffix: str, overwrite: bool = False) -> str:
    """``folder/stem+suffix``; if it exists and overwrite is off, ``stem_00001+suffix`` and so on."""
    stem = safe_name(stem)
    first = os.path.join(folder, stem + suffix)
    if overwrite or not os.path.exists(first):
        return first
    for i in range(1, 100000):
        cand = os.path.join(folder, f"{stem}_{i:05d}{suffix}")
        if not os.path.exists(cand):
            return cand
    raise InvalidInputError(f"too many files named {stem}* in {folder}; choose another name")


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create output folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"output folder {folder} is not writable; choose another location")


def atomic_dir(final: str, write, overwrite: bool = False) -> str:
    """Build a folder in a temporary sibling, then rename it into place (whole or absent)."""
    parent = os.path.dirname(os.path.abspath(final))
    check_writable(parent)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(final) + ".", dir=parent)
    try:
        write(tmp)
        if os.path.exists(final):
            if not overwrite:
                raise InvalidInputError(f"{final} already exists; enable overwrite or choose another name")
            old = final + ".old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
