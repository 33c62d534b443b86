"""`python -m ldm_core.train curve --model DIR --out docs/learning_curve.png`: the learning curve of a built-in
model folder, drawn from the points its TRAINING.json records (refine's `--export-every`: samples seen, UNet
seconds, and the held-out evaluation's single-object shape+colour, position and background, and two objects
both right), one line per measure against samples seen, with the issue's bars as dashed lines. Points of
earlier sittings (the folder's history) come first. Drawn with Pillow only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = (  # key in a point's "eval", label, colour, bar
    ("shape_colour", "shape+colour", (214, 39, 40), 0.90),
    ("position", "position", (31, 119, 180), 0.90),
    ("background", "background", (44, 160, 44), 0.95),
    ("two_objects_both_right", "two objects", (148, 103, 189), 0.50),
)


def curve_points(record: dict) -> list[dict]:
    """Every learning-curve point of a TRAINING.json record, oldest first, with an `eval` section."""
    runs = [*record.get("history", []), record]
    pts = [pt for run in runs for pt in (run.get("progress") or {}).get("curve", []) if pt.get("eval")]
    return sorted(pts, key=lambda pt: pt.get("time", 0))


def draw(points: list[dict], out: Path, title: str = "built-in model: learning curve") -> Path:
    w, h, left, right, top, bottom = 720, 420, 60, 160, 40, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((left, 12), title, fill="black")
    x0, x1, y0, y1 = left, w - right, h - bottom, top
    d.rectangle((x0, y1, x1, y0), outline="black")
    max_x = max([pt["samples_seen"] for pt in points] + [1])

    def px(samples: float, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * samples / max_x, y0 - (y0 - y1) * value

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = px(0, v)[1]
        d.line((x0 - 4, y, x0, y), fill="black")
        d.text((x0 - 40, y - 6), f"{v:.0%}", fill="black")
    for k in range(5):
        s = max_x * k / 4
        x = px(s, 0)[0]
        d.line((x, y0, x, y0 + 4), fill="black")
        d.text((x - 20, y0 + 8), f"{s / 1000:.0f}k", fill="black")
    d.text(((x0 + x1) // 2 - 40, h - 22), "samples seen", fill="black")
    for i, (key, label, colour, bar) in enumerate(SERIES):
        yb = px(0, bar)[1]
        for xs in range(x0, x1, 8):  # the bar, dashed
            d.line((xs, yb, min(xs + 4, x1), yb), fill=colour)
        xy = [px(pt["samples_seen"], pt["eval"][key]) for pt in points if key in pt["eval"]]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.line((x1 + 12, y1 + 14 + 18 * i, x1 + 30, y1 + 14 + 18 * i), fill=colour, width=3)
        d.text((x1 + 36, y1 + 8 + 18 * i), f"{label} (bar {bar:.0%})", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model folder with a TRAINING.json")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")


def run(a: argparse.Namespace) -> int:
    record = json.loads((a.model / "TRAINING.json").read_text(encoding="utf-8"))
    points = curve_points(record)
    if not points:
        print(f"{a.model}/TRAINING.json records no evaluated learning-curve points (refine --export-every)")
        return 1
    draw(points, a.out)
    last = points[-1]
    print(f"{a.out}: {len(points)} points, last at {last['samples_seen']} samples: {last['eval']}")
    return 0
