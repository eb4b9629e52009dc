"""The retrieval figure, drawn with Pillow only (the SCAN paper's Fig. 1 and Fig. 4).

One row per query: the query first, then each model's top-k neighbours framed green (the query's class) or
red (another class), captioned with class and similarity; headers give each model's precision@k. The
geometry is :class:`Layout`'s, so the JSON beside the PNG can record every image's pixel box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from scan_zoo.data.imageio import UnreadableImage
from scan_zoo.eval import figures
from scan_zoo.eval.figures import FONT_SIZE

logger = logging.getLogger(__name__)


GREEN = (0, 170, 0)  # frame of a neighbour of the query's class
RED = (220, 0, 0)  # frame of a neighbour of another class
QUERY_FRAME = (60, 60, 60)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MUTED = (90, 90, 90)

TILE = 64  # image side in the figure (32-px digits are upscaled x2, nearest)
FRAME = 4  # coloured frame around each image
GAP = 4  # between the neighbours of one model
GROUP_GAP = 20  # between the query column and each model's group
ROW_GAP = 6  # between query rows
MARGIN = 10  # around the whole figure
LINE = 14  # height of one line of text (captions, headers, legend)
HEADER_LINES = 3  # model name, precision@k on the queries shown, precision@k on all val
LEGEND_LINES = 2


# ------------------------------------------------------------------------------------------------ figure
@dataclass(frozen=True)
class Layout:
    """Pixel geometry of the grid: ``rows`` queries, ``models`` groups of ``k`` neighbours each."""

    rows: int
    models: int
    k: int
    tile: int = TILE

    @property
    def cell(self) -> int:
        """Side of a framed image."""
        return self.tile + 2 * FRAME

    @property
    def group_width(self) -> int:
        return self.k * self.cell + (self.k - 1) * GAP

    @property
    def top(self) -> int:
        """y of the first row of images (below the headers)."""
        return MARGIN + HEADER_LINES * LINE + ROW_GAP

    @property
    def row_height(self) -> int:
        return self.cell + LINE  # framed image + caption

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the PNG."""
        width = 2 * MARGIN + self.cell + self.models * (GROUP_GAP + self.group_width)
        height = (
            self.top + self.rows * self.row_height + (self.rows - 1) * ROW_GAP + ROW_GAP + LEGEND_LINES * LINE + MARGIN
        )
        return width, height

    def group_x(self, model: int) -> int:
        """x of the first neighbour of ``model``'s group."""
        return MARGIN + self.cell + GROUP_GAP + model * (GROUP_GAP + self.group_width)

    def box(self, row: int, model: int | None = None, rank: int = 0) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a framed image: the query (``model`` None) or a neighbour."""
        y = self.top + row * (self.row_height + ROW_GAP)
        x = MARGIN if model is None else self.group_x(model) + rank * (self.cell + GAP)
        return x, y, x + self.cell, y + self.cell


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text``, shortened with an ellipsis (keeping its end, where names differ) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    for cut in range(1, len(text)):
        short = "..." + text[cut:]
        if draw.textlength(short, font=font) <= width:
            return short
    return ""


def _tile(img: Image.Image, side: int) -> Image.Image:
    """A square ``side`` x ``side`` view of ``img``: centre square, nearest when enlarging (pixels stay crisp)."""
    img = img.convert("RGB")
    method = Image.Resampling.NEAREST if min(img.size) <= side else Image.Resampling.LANCZOS
    return ImageOps.fit(img, (side, side), method=method)


def open_image(ds, path: str) -> Image.Image:
    """The image at ``path`` of ImageFolder ``ds``; a grey square if it cannot be read (as EvalImages does)."""
    try:
        return ds.loader(path)
    except UnreadableImage as e:
        logger.warning("unreadable image drawn as a grey square: %s", e)
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def _framed(draw: ImageDraw.ImageDraw, canvas: Image.Image, img: Image.Image, box, colour, tile: int) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    canvas.paste(_tile(img, tile), (x0 + FRAME, y0 + FRAME))


def retrieval_grid(
    query_images: Sequence[Image.Image],
    query_captions: Sequence[str],
    query_labels: Sequence[int],
    model_names: Sequence[str],
    neighbor_images: Sequence[Sequence[Sequence[Image.Image]]],
    neighbor_labels: Sequence[Sequence[Sequence[int]]],
    neighbor_captions: Sequence[Sequence[Sequence[str]]],
    precision_shown: Sequence[float],
    precision_all: Sequence[float | None] = (),
    total_queries: int | None = None,
    tile: int = TILE,
) -> Image.Image:
    """The figure as a PIL image (:func:`scan_zoo.eval.retrieval.run_retrieval` draws it and writes the JSON).

    ``neighbor_*[m][q][r]``: model ``m``, query ``q``, rank ``r``. Frames are :data:`GREEN` where the
    neighbour's label equals the query's, :data:`RED` otherwise; the geometry is :class:`Layout`'s.
    Headers: each model's name, precision@k over the queries drawn and (when given) over ``total_queries``.
    """
    rows, models = len(query_images), len(model_names)
    k = len(neighbor_images[0][0]) if models else 0
    assert models >= 1 and rows >= 1 and k >= 1, "a grid needs a query, a model and a neighbour"
    assert len(neighbor_images) == len(neighbor_labels) == len(precision_shown) == models, "one entry per model"
    layout = Layout(rows, models, k, tile)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = figures.font(), figures.font(FONT_SIZE - 1)

    # headers
    draw.text((MARGIN, MARGIN), "query", fill=TEXT, font=font)
    draw.text((MARGIN, MARGIN + LINE), "(val)", fill=MUTED, font=small)
    for m, name in enumerate(model_names):
        x, w = layout.group_x(m), layout.group_width
        draw.text((x, MARGIN), _fit_text(draw, name, w, font), fill=TEXT, font=font)
        line = f"P@{k} = {precision_shown[m]:.2f} on these {rows}"
        draw.text((x, MARGIN + LINE), _fit_text(draw, line, w, small), fill=TEXT, font=small)
        if m < len(precision_all) and precision_all[m] is not None:
            line = f"P@{k} = {precision_all[m]:.2f} on all {total_queries or ''} val".replace("  ", " ")
            draw.text((x, MARGIN + 2 * LINE), _fit_text(draw, line, w, small), fill=MUTED, font=small)

    # rows
    for q in range(rows):
        box = layout.box(q)
        _framed(draw, canvas, query_images[q], box, QUERY_FRAME, tile)
        draw.text((box[0], box[3] + 1), _fit_text(draw, query_captions[q], layout.cell, small), fill=TEXT, font=small)
        for m in range(models):
            for r in range(k):
                box = layout.box(q, m, r)
                same = neighbor_labels[m][q][r] == query_labels[q]
                _framed(draw, canvas, neighbor_images[m][q][r], box, GREEN if same else RED, tile)
                caption = _fit_text(draw, neighbor_captions[m][q][r], layout.cell, small)
                draw.text((box[0], box[3] + 1), caption, fill=GREEN if same else RED, font=small)

    # legend
    y = layout.size[1] - MARGIN - LEGEND_LINES * LINE
    x = MARGIN
    for colour, text in ((GREEN, "query's class"), (RED, "other class")):
        draw.rectangle((x, y + 2, x + 9, y + 11), fill=colour)
        draw.text((x + 14, y), text, fill=TEXT, font=small)
        x += 14 + int(draw.textlength(text, font=small)) + 16
    note = f"top-{k} train neighbours by cosine similarity; captions: class, similarity"
    draw.text((MARGIN, y + LINE), _fit_text(draw, note, layout.size[0] - 2 * MARGIN, small), fill=MUTED, font=small)
    return canvas
