"""The loss-curve image shown by DreamBoothTrain and saved beside the checkpoints."""

from __future__ import annotations

import itertools
import math

from ..manager.errors import get_logger

logger = get_logger(__name__)


def loss_plot(losses: list[float], width: int = 640, height: int = 360, title: str = "training loss"):
    """A loss-curve image drawn with PIL (raw loss + moving average)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 28, height - 36
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if not vals:
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=(120, 120, 120))
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

    def xy(i, v):
        x = left + (right - left) * (i / max(1, len(vals) - 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{v:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 8), f"step {len(vals)}", fill=(0, 0, 0))
    if len(vals) == 1:
        x, y = xy(0, vals[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(70, 130, 220))
        return img
    draw.line([xy(i, v) for i, v in enumerate(vals)], fill=(150, 180, 235), width=1)
    k = 2.0 / (min(len(vals), 50) / 5 + 1)  # moving average spanning a fifth of the steps (at most 10)
    smooth = list(itertools.accumulate(vals, lambda ema, v: ema + k * (v - ema)))
    draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    return img


def save_loss_plot(losses: list, path: str | None):
    """The loss plot; written atomically to ``path`` when given (a failure only warns)."""
    from ..manager.paths import atomic_file

    plot = loss_plot(losses)
    if path:
        try:
            atomic_file(path, lambda tmp: plot.save(tmp, format="PNG"))
        except OSError as e:
            logger.warning("could not save the loss plot: %s", e)
    return plot
