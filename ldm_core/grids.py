"""Image grids: the grid A1111 puts before a batch's images, and the labelled grids of the X/Y/Z plot and
prompt matrix scripts.

Layout follows A1111: a batch grid has round(sqrt(n)) rows (at most n) and as many columns as needed, cells
in reading order, empty spots left black; a labelled grid gets a band of column labels above and a band of
row labels on its left, drawn with PIL's built-in font (nothing is downloaded), with `margin` px between
cells. Grids are saved like any output (infotext + manifest, never overwriting) into A1111's
`outputs/<mode>-grids/<date>/` folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .engine import GenerationResult
from .infotext import format_value, quote
from .outputs import output_folder, save_image

LABEL_COLOUR = (0, 0, 0)
BACKGROUND = (255, 255, 255)
GRID_PATTERN = "[number]-grid"


@dataclass(frozen=True)
class GridOptions:
    """What to do with a grid: `return_grid` puts it first in the result (A1111 option `return_grid`),
    `save` writes it to the outputs folder (A1111: option `grid_save` and not the request's
    `do_not_save_grid`). `only_if_multiple`: no grid for a single image (A1111 `grid_only_if_multiple`)."""

    return_grid: bool = True
    save: bool = False
    only_if_multiple: bool = True


def grid_rows(count: int, rows: int | None = None) -> int:
    """Rows of a grid of `count` images: `rows` when given, else round(sqrt(count)), at least 1 and at most
    `count` (A1111's automatic layout)."""
    if count <= 0:
        return 1
    if rows is None or rows <= 0:
        rows = round(math.sqrt(count))
    return max(1, min(int(rows), count))


def image_grid(images: Sequence[Image.Image], rows: int | None = None, margin: int = 0) -> Image.Image:
    """The images pasted into a rows x cols grid (reading order), each cell the size of the largest image;
    `margin` px of black between cells."""
    if not images:
        raise ValueError("a grid needs at least one image")
    rows = grid_rows(len(images), rows)
    cols = math.ceil(len(images) / rows)
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    mode = "RGBA" if any(im.mode == "RGBA" for im in images) else "RGB"
    grid = Image.new(mode, (cols * cw + (cols - 1) * margin, rows * ch + (rows - 1) * margin))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert(mode), (c * (cw + margin), r * (ch + margin)))
    return grid


def _font(cell_w: int, cell_h: int) -> ImageFont.ImageFont:
    size = max(10, min(48, round(min(cell_w, cell_h) / 6)))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken into lines that fit `width` px (a single over-long word stays whole)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if line and draw.textlength(cand, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines


def annotated_grid(
    grid: Image.Image,
    cell_w: int,
    cell_h: int,
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    margin: int = 0,
) -> Image.Image:
    """`grid` (cells of cell_w x cell_h with `margin` px between them) with `col_labels` centred above the
    columns and `row_labels` centred left of the rows, on a white background. Labels that are all empty
    take no space."""
    font = _font(cell_w, cell_h)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.getbbox("Ag")[3] + 4
    pad = max(4, line_h // 2)
    col_lines = [_wrap(scratch, t, font, cell_w - 4) if t else [] for t in col_labels]
    row_w = min(max(cell_w, 64) * 3 // 2, 400)
    row_lines = [_wrap(scratch, t, font, row_w - 2 * pad) if t else [] for t in row_labels]
    top = (max(len(ls) for ls in col_lines) * line_h + 2 * pad) if any(col_lines) else 0
    left = row_w if any(row_lines) else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), BACKGROUND)
    out.paste(grid.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(out)
    for c, lines in enumerate(col_lines):
        cx = left + c * (cell_w + margin) + cell_w / 2
        y = top - pad - len(lines) * line_h
        for line in lines:
            draw.text((cx - draw.textlength(line, font=font) / 2, y), line, fill=LABEL_COLOUR, font=font)
            y += line_h
    for r, lines in enumerate(row_lines):
        cy = top + r * (cell_h + margin) + cell_h / 2
        y = cy - len(lines) * line_h / 2
        for line in lines:
            draw.text((left - pad - draw.textlength(line, font=font), y), line, fill=LABEL_COLOUR, font=font)
            y += line_h
    return out


def labelled_grid(
    images: Sequence[Image.Image],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    *,
    draw_legend: bool = True,
    margin: int = 0,
) -> Image.Image:
    """A len(row_labels) x len(col_labels) grid of `images` (row by row) with its axis labels (when
    `draw_legend`)."""
    rows = max(1, len(row_labels))
    grid = image_grid(images, rows=rows, margin=margin)
    if not draw_legend:
        return grid
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    return annotated_grid(grid, cw, ch, col_labels, row_labels, margin)


def append_params(infotext: str, params: dict[str, Any]) -> str:
    """`infotext` with `params` ("Key": value) added to its parameters line, quoted as A1111 reads them."""
    extra = ", ".join(f"{k}: {quote(format_value(v))}" for k, v in params.items() if v is not None and v != "")
    if not extra:
        return infotext
    if not infotext:
        return extra
    return f"{infotext}, {extra}"


def grids_folder(outputs_dir: Path, mode: str) -> Path:
    """`outputs/<mode>-grids/<date>` (A1111's txt2img-grids / img2img-grids)."""
    base = "img2img" if mode in ("img2img", "inpaint") else mode
    return output_folder(outputs_dir, f"{base}-grids")


def save_grid(
    grid: Image.Image,
    outputs_dir: Path,
    mode: str,
    *,
    infotext: str,
    manifest: dict | None,
    seed: int,
    prompt: str = "",
    model_name: str = "",
) -> Path:
    """Write a grid into `grids_folder(outputs_dir, mode)` as NNNNN-grid.png with its infotext."""
    return save_image(
        grid,
        grids_folder(outputs_dir, mode),
        infotext=infotext,
        manifest=manifest,
        seed=seed,
        pattern=GRID_PATTERN,
        model_name=model_name,
        prompt=prompt,
    )


@dataclass
class GriddedResult(GenerationResult):
    """A GenerationResult whose `images` may start with grids (A1111: `index_of_first_image` of them), and
    whose images may have different prompts (scripts). `images`, `infotexts`, `seeds`, `subseeds` and
    `manifests` stay aligned (a grid carries its first image's seed); A1111's `info` leaves the grids out of
    `all_seeds`/`all_prompts` and keeps them in `infotexts`."""

    index_of_first_image: int = 0
    all_prompts: list[str] = field(default_factory=list)  # one per image after the grids; [] = the request's
    all_negative_prompts: list[str] = field(default_factory=list)
    extra_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: GenerationResult, **changes: Any) -> GriddedResult:
        values = {f.name: getattr(result, f.name) for f in fields(result) if f.init}
        values.update(changes)
        return cls(**values)

    def info(self, request: Any) -> dict[str, Any]:
        out = super().info(request)
        k = self.index_of_first_image
        singles = len(self.images) - k
        out["all_seeds"] = self.seeds[k:]
        out["all_subseeds"] = self.subseeds[k:]
        if self.seeds[k:]:
            out["seed"] = self.seeds[k]
        if self.subseeds[k:]:
            out["subseed"] = self.subseeds[k]
        out["all_prompts"] = list(self.all_prompts) or [request.prompt] * singles
        out["all_negative_prompts"] = list(self.all_negative_prompts) or [request.negative_prompt] * singles
        if self.all_prompts:
            out["prompt"] = self.all_prompts[0]
        out["index_of_first_image"] = k
        out.update(self.extra_info)
        return out


def with_batch_grid(
    result: GenerationResult, options: GridOptions, outputs_dir: Path, mode: str, prompt: str = ""
) -> GenerationResult:
    """`result` with A1111's batch grid first (when `options.return_grid` and more than one image, or
    `only_if_multiple` is off), saved when `options.save`. The grid carries the first image's infotext;
    `index_of_first_image` becomes 1. The result is returned unchanged when no grid applies."""
    images = list(result.images)
    if not images or (len(images) < 2 and options.only_if_multiple):
        return result
    if result.videos:  # a clip's frames make no grid (sd-webui-animatediff returns the clip instead)
        return result
    if not options.return_grid and not options.save:
        return result
    grid = image_grid(images)
    text = result.infotexts[0] if result.infotexts else ""
    manifest = result.manifests[0] if result.manifests else None
    path = None
    if options.save:
        path = save_grid(
            grid,
            outputs_dir,
            mode,
            infotext=text,
            manifest=manifest,
            seed=result.seeds[0] if result.seeds else -1,
            prompt=prompt,
            model_name=result.model_name,
        )
    if not options.return_grid:
        return result
    changes: dict[str, Any] = {
        "images": [grid, *images],
        "infotexts": [text, *result.infotexts],
        "seeds": [result.seeds[0] if result.seeds else -1, *result.seeds],
        "subseeds": [result.subseeds[0] if result.subseeds else -1, *result.subseeds],
        "manifests": [manifest or {}, *result.manifests],
        "index_of_first_image": 1 + getattr(result, "index_of_first_image", 0),
    }
    if path is not None and len(result.paths) == len(images):
        changes["paths"] = [path, *result.paths]
    return GriddedResult.from_result(result, **changes)
