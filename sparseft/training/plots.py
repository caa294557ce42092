"""Pictures of sparsity: a per-layer bar chart and mask heat-maps, as RGB arrays and PNG files.

TensorBoard (:mod:`sparseft.training.tensorboard`) and ``sparseft report`` (:mod:`sparseft.cli.report`)
draw the same figures from here. They are drawn with Pillow and NumPy (no plotting library):
an image is an ``[height, width, 3]`` ``uint8`` array, what ``SummaryWriter.add_image(...,
dataformats="HWC")`` takes and what :func:`save_png` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (215, 215, 215)
BAR = (49, 110, 176)
#: heat-map colours from "all pruned" (0) to "all kept" (1)
PRUNED_COLOUR = np.array([247, 251, 255], dtype=np.float32)
KEPT_COLOUR = np.array([8, 48, 107], dtype=np.float32)
ROW_HEIGHT = 16
BAR_WIDTH = 360
MARGIN = 8
COLOUR_BAR_WIDTH = 16


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=12)


def _text_width(text: str) -> int:
    left, _, right, _ = _font().getbbox(text)
    return int(right - left)


def short_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share (``bert.encoder.layer.`` → ``0.attention...``)."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    return [name[len(prefix):] for name in names]


def sparsity_bar_chart(names: list[str], sparsities: list[float], title: str) -> np.ndarray:
    """One horizontal bar per layer, its length the layer's sparsity (0 to 1), value printed beside it."""
    if len(names) != len(sparsities):
        raise ValueError(f"{len(names)} layer names but {len(sparsities)} sparsities")
    labels = short_names(names)
    font = _font()
    label_width = max([_text_width(label) for label in labels] + [40])
    left = MARGIN + label_width + MARGIN
    top = MARGIN + 2 * ROW_HEIGHT
    width = left + BAR_WIDTH + 64
    height = top + ROW_HEIGHT * len(labels) + 2 * ROW_HEIGHT
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font)
    bottom = top + ROW_HEIGHT * len(labels)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + round(tick * BAR_WIDTH)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x - 8, bottom + 3), f"{tick:.2f}", fill=INK, font=font)
    for row, (label, sparsity) in enumerate(zip(labels, sparsities)):
        y = top + row * ROW_HEIGHT
        draw.text((left - MARGIN - _text_width(label), y + 2), label, fill=INK, font=font)
        draw.rectangle([left, y + 3, left + round(min(max(sparsity, 0.0), 1.0) * BAR_WIDTH), y + ROW_HEIGHT - 3],
                       fill=BAR)
        draw.text((left + BAR_WIDTH + 16, y + 2), f"{sparsity:.1%}", fill=INK, font=font)
    return np.asarray(image)


def kept_density(mask: torch.Tensor, max_side: int = 256) -> np.ndarray:
    """Fraction of weights kept per cell of a grid at most ``max_side`` cells a side: average pooling
    of the ``[out, in]`` mask by one factor for both sides, so the picture keeps the matrix's aspect
    (a mask that fits keeps one cell per weight)."""
    kept = (mask.detach() != 0).float().cpu()
    factor = -(-max(kept.shape) // max_side)
    size = (-(-kept.shape[0] // factor), -(-kept.shape[1] // factor))
    return F.adaptive_avg_pool2d(kept[None, None], size)[0, 0].numpy()


@dataclass
class Heatmap:
    """A drawn mask heat-map: the ``[height, width, 3]`` ``uint8`` image, the boxes of its parts
    (``cells``, ``colour_bar``) as ``(left, top, right, bottom)`` pixels, and every text in it."""

    image: np.ndarray
    boxes: dict[str, tuple[int, int, int, int]]
    texts: list[str]


def mask_heatmap(mask: torch.Tensor, title: str, max_side: int = 256, min_side: int = 512,
                 min_short_side: int = 192) -> Heatmap:
    """The mask as a picture: rows are output units, columns input features, darker is more kept,
    with axis labels and a colour bar (kept at the top, pruned at the bottom) as its legend.

    Large masks are averaged into at most ``max_side`` cells a side; small ones are enlarged (each
    weight or cell a square of pixels) until the longer side is at least ``min_side`` pixels and the
    shorter one ``min_short_side`` (a wide FFN matrix), the longer one staying within 1024.
    """
    density = kept_density(mask, max_side)
    colours = PRUNED_COLOUR + density[..., None] * (KEPT_COLOUR - PRUNED_COLOUR)
    cells = Image.fromarray(colours.round().astype(np.uint8), "RGB")
    scale = max(-(-min_side // max(density.shape)), -(-min_short_side // min(density.shape)))
    scale = max(1, min(scale, 1024 // max(density.shape)))
    cells = cells.resize((density.shape[1] * scale, density.shape[0] * scale), Image.Resampling.NEAREST)
    rows, columns = mask.shape
    kept_fraction = float((mask != 0).float().mean()) if mask.numel() else 0.0
    caption = f"{tuple(mask.shape)}, {kept_fraction:.1%} of the weights kept"
    x_label, y_label = f"input features (columns 0-{columns - 1})", f"output units (rows 0-{rows - 1})"
    vertical = _vertical_text(y_label)
    legend = ("kept", "50% kept", "pruned")  # a cell averaging several weights shows the fraction kept
    left, top = MARGIN + ROW_HEIGHT + MARGIN, MARGIN + 2 * ROW_HEIGHT + MARGIN
    cells_box = (left, top, left + cells.width, top + cells.height)
    bar_left = cells_box[2] + 2 * MARGIN
    bar_box = (bar_left, top, bar_left + COLOUR_BAR_WIDTH, cells_box[3])
    width = max(bar_box[2] + MARGIN + max(_text_width(text) for text in legend),
                left + _text_width(x_label), _text_width(title), _text_width(caption)) + 2 * MARGIN
    height = max(cells_box[3] + ROW_HEIGHT, top + vertical.height) + 2 * MARGIN
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=_font())
    draw.text((MARGIN, MARGIN + ROW_HEIGHT), caption, fill=INK, font=_font())
    image.paste(cells, cells_box[:2])
    draw.rectangle((cells_box[0] - 1, cells_box[1] - 1, cells_box[2], cells_box[3]), outline=GRID)
    draw.text((left, cells_box[3] + MARGIN // 2), x_label, fill=INK, font=_font())
    image.paste(vertical, (MARGIN, top))
    gradient = np.linspace(1.0, 0.0, bar_box[3] - bar_box[1])[:, None, None]  # kept at the top
    bar = PRUNED_COLOUR + gradient * (KEPT_COLOUR - PRUNED_COLOUR)
    image.paste(Image.fromarray(np.repeat(bar, COLOUR_BAR_WIDTH, 1).round().astype(np.uint8), "RGB"), bar_box[:2])
    draw.rectangle(bar_box, outline=INK)
    for text, y in zip(legend, (bar_box[1], (bar_box[1] + bar_box[3] - ROW_HEIGHT) // 2, bar_box[3] - ROW_HEIGHT)):
        draw.text((bar_box[2] + MARGIN, y), text, fill=INK, font=_font())
    boxes = {"cells": cells_box, "colour_bar": bar_box}
    return Heatmap(np.asarray(image), boxes, [title, caption, x_label, y_label, *legend])


def _vertical_text(text: str) -> Image.Image:
    """``text`` written bottom to top, for a y-axis label."""
    label = Image.new("RGB", (_text_width(text) + 2, ROW_HEIGHT), BACKGROUND)
    ImageDraw.Draw(label).text((0, 0), text, fill=INK, font=_font())
    return label.rotate(90, expand=True)


def heatmap_layers(count: int, wanted: int = 3) -> list[int]:
    """Indices of the layers worth a heat-map: first, middle and last (fewer when there are fewer)."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``[height, width, 3]`` ``uint8`` image as a PNG file."""
    path = Path(path)
    Image.fromarray(image, "RGB").save(path, format="PNG")
    return path
