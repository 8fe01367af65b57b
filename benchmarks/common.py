"""What the benchmark scripts share: the `name: value` output lines, the thread setting, importing the checkout."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def emit(name: str, value) -> None:
    """Print one figure as ``name: value``."""
    print(f"{name}: {_text(value)}", flush=True)


def emit_spread(name: str, values) -> None:
    """Print a per-round figure as ``name: median (min lo, max hi, n rounds)``.

    Every ratio is printed this way: its median over the rounds, and the
    smallest and largest single-round value, so one line shows how far a
    figure moved on this machine.
    """
    values = [float(v) for v in values]
    if not values:
        emit(name, "no rounds")
        return
    lo, hi, mid = min(values), max(values), statistics.median(values)
    rounds = "round" if len(values) == 1 else "rounds"
    emit(name, f"{_text(mid)} (min {_text(lo)}, max {_text(hi)}, {len(values)} {rounds})")


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and one inter-op thread) for the whole run."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work has started)
        pass


def import_turbobooth():
    """``import turbobooth``; where the checkout is not pip-installed (ComfyUI's own python), import it by path,
    the way ComfyUI imports a folder in ``custom_nodes``."""
    try:
        import turbobooth

        return turbobooth
    except ModuleNotFoundError as e:
        if e.name != "turbobooth":
            raise
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "turbobooth", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["turbobooth"] = module
    spec.loader.exec_module(module)
    return module
