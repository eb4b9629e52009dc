"""What every figure drawn with Pillow shares: the font (the retrieval grid here, the benchmark charts above)."""

from __future__ import annotations

from PIL import ImageFont

FONT_SIZE = 11


def font(size: int = FONT_SIZE):
    """Pillow's default font at ``size`` pixels; the fixed bitmap font where Pillow has no FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
