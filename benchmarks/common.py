"""What both benchmark scripts share: the `name: value` output line and the thread setting."""

from __future__ import annotations


def emit(name: str, value) -> None:
    """Print one figure as ``name: value``."""
    if isinstance(value, float):
        text = f"{value:.3e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    else:
        text = str(value)
    print(f"{name}: {text}", flush=True)


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and one inter-op thread) for the whole run."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work has started)
        pass
