"""Safe output names, names confined to their folder, and the one atomic writer for files and folders."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable

from .errors import InvalidInputError, ModelSourceError, TurboBoothError

_SAFE = re.compile(r"[^A-Za-z0-9._ -]+")


class WriteError(TurboBoothError, OSError):
    """A file or folder could not be written; nothing partial was left behind."""


def safe_name(name: str, default: str = "turbobooth") -> str:
    """A file name without directories, traversal or odd characters ("../x/y" -> "x_y")."""
    if not isinstance(name, str):
        raise InvalidInputError(f"name must be text, got {name!r}")
    parts = [p for p in re.split(r"[\\/]+", name.strip()) if p not in ("", ".", "..")]
    cleaned = _SAFE.sub("_", "_".join(parts)).strip(" .")
    return cleaned[:120] or default


def confined(name: str, roots: Iterable[str], what: str, where: str) -> str:
    """``name`` (relative, from a widget or a request) resolved inside one of ``roots``, or refused.

    Absolute paths and ``..`` are refused with the same message whether or not the target exists, so the answer
    never tells what lies outside the folders. Links that the owner put inside a folder are followed, as
    ComfyUI follows them.
    """
    roots = [os.path.abspath(r) for r in roots if r]
    refuse = InvalidInputError(
        f"{what} {name!r} must be a name inside {where} (no absolute path, no '..'); put the file there and pick it "
        "from the list"
    )
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise refuse
    parts = re.split(r"[\\/]+", name.strip())
    if os.path.isabs(name) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise refuse
    for root in roots:
        candidate = os.path.abspath(os.path.join(root, *parts))
        if os.path.commonpath([root, candidate]) == root and os.path.exists(candidate):
            return candidate
    raise ModelSourceError(f"{what} {name!r} was not found in {where}; put it there or choose another")


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


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.exists(path) else 0


def _write_error(final: str, tmp: str, e: OSError) -> WriteError:
    parent = os.path.dirname(os.path.abspath(final))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(parent).free if os.path.isdir(parent) else 0
        return WriteError(
            f"cannot write {final}: the disk is full ({free / 2**20:.1f} MiB free, at least "
            f"{max(_size(tmp), 1) / 2**20:.1f} MiB more needed); free some space and run again"
        )
    return WriteError(f"cannot write {final}: {e.strerror or e}")


def atomic_file(final: str, write: Callable[[str], object], folder: bool = False, overwrite: bool = True) -> str:
    """``write(tmp_path)`` into a temporary file (``folder``: folder) beside ``final``, then rename it into place.

    The result is whole or absent: on any error or cancel the temporary one is removed. It has the mode a plain
    ``open()``/``mkdir()`` would give (the umask applies). An existing folder is replaced only with ``overwrite``.
    """
    parent = os.path.dirname(os.path.abspath(final))
    check_writable(parent)
    prefix = "." + os.path.basename(final) + "."
    if folder:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    old = None
    try:
        write(tmp)
        os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
        if folder and os.path.exists(final):  # a folder cannot be renamed over another: move the old one aside
            if not overwrite:
                raise InvalidInputError(f"{final} already exists; enable overwrite or choose another name")
            old = tempfile.mkdtemp(prefix=prefix + "old.", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as e:
        err = _write_error(final, tmp, e) if isinstance(e, OSError) else None
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if old and os.path.exists(old) and not os.path.exists(final):
            os.replace(old, final)
        if err is None:
            raise
        raise err from e
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_dir(final: str, write: Callable[[str], object], overwrite: bool = True) -> str:
    """Build a folder in a temporary sibling with ``write(tmp_dir)``, then rename it into place (whole or absent)."""
    return atomic_file(final, write, folder=True, overwrite=overwrite)
