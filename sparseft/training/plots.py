"""Pictures of sparsity: a per-layer bar chart and mask heat-maps, as RGB arrays and PNG files.

TensorBoard (:mod:`sparseft.training.tensorboard`) and ``sparseft report`` (:mod:`sparseft.cli.report`)
draw the same figures from here. They are drawn with Pillow and NumPy (no plotting library):
an image is an ``[height, width, 3]`` ``uint8`` array, what ``SummaryWriter.add_image(...,
dataformats="HWC")`` takes and what :func:`save_png` writes.
"""

from __future__ import annotations

import os
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


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=11)


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


def mask_heatmap(mask: torch.Tensor, title: str, max_side: int = 256, min_side: int = 192) -> np.ndarray:
    """The mask as a picture: rows are output units, columns input features, darker is more kept.

    Large masks are averaged into at most ``max_side`` cells a side; small ones are enlarged (each
    weight a square of pixels) to at least ``min_side`` pixels a side.
    """
    density = kept_density(mask, max_side)
    colours = PRUNED_COLOUR + density[..., None] * (KEPT_COLOUR - PRUNED_COLOUR)
    cells = Image.fromarray(colours.round().astype(np.uint8), "RGB")
    scale = max(1, -(-min_side // max(density.shape)))
    cells = cells.resize((density.shape[1] * scale, density.shape[0] * scale), Image.Resampling.NEAREST)
    kept_fraction = float((mask != 0).float().mean()) if mask.numel() else 0.0
    caption = f"{tuple(mask.shape)} kept {kept_fraction:.1%}; rows: outputs, columns: inputs"
    width = max(cells.width, _text_width(title), _text_width(caption)) + 2 * MARGIN
    image = Image.new("RGB", (width, cells.height + 2 * ROW_HEIGHT + 2 * MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=_font())
    draw.text((MARGIN, MARGIN + ROW_HEIGHT), caption, fill=INK, font=_font())
    image.paste(cells, (MARGIN, MARGIN + 2 * ROW_HEIGHT))
    return np.asarray(image)


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
