"""The Outpainting mk2 script (img2img): grow the canvas by some pixels in the chosen directions and
inpaint the new area (`pipeline.outpaint`); a grid first when several images are made.

`script_args` (A1111's order): info (an HTML note, any value), pixels (8..256), mask_blur (0..64),
direction (a list of "left", "right", "up", "down"), noise_q, color_variation.

As in A1111, the new area starts as noise matched to the image (`matched_noise`): random noise whose
spectrum is shaped like the known pixels' (a lower `noise_q`, the fall-off exponent, keeps more fine
detail), coloured by `color_variation` (0 = grey noise, 1 = independent per channel), and whose values
follow each channel's histogram of the known pixels; the inpainting then starts from it ("original"
masked content) and is pasted back over the unmasked original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ..grids import GriddedResult, append_params, with_batch_grid
from ..pipeline.outpaint import outpaint_canvas, work_side
from ..rng import resolve_seed
from .base import ARGS_FIELD, Script, ScriptArg, ScriptRun, arg_at, as_number, bad_arg, request_values

TITLE = "Outpainting mk2"
DIRECTIONS = ("left", "right", "up", "down")
INFO = "Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8"


def _match_histogram(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`values` remapped so their distribution follows `reference`'s (rank -> reference quantile)."""
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    quantiles = (ranks + 0.5) / len(values)
    return np.quantile(reference, quantiles)


def matched_noise(
    image: Image.Image, mask: Image.Image, noise_q: float = 1.0, color_variation: float = 0.05, seed: int = 0
) -> Image.Image:
    """`image` (RGB) with its masked area (mask L, 255 = new) replaced by noise that looks like the rest:
    white noise shaped in frequency space by the known area's amplitude spectrum raised to `noise_q`, mixed
    from grey and per-channel noise by `color_variation`, then histogram-matched per channel to the known
    pixels. Deterministic for a `seed`."""
    src = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    new = np.asarray(mask.convert("L")) >= 128
    known = ~new
    if not new.any() or not known.any():
        return image.convert("RGB")
    h, w, _ = src.shape
    filled = src.copy()
    filled[new] = src[known].mean(axis=0)  # no hard edges of black in the spectrum
    rng = np.random.default_rng(seed)
    grey = rng.random((h, w, 1))
    colour = rng.random((h, w, 3))
    noise = (1.0 - color_variation) * grey + color_variation * colour
    out = src.copy()
    for c in range(3):
        amplitude = np.abs(np.fft.fft2(filled[:, :, c] - filled[:, :, c].mean()))
        shaped = np.fft.fft2(noise[:, :, c] - noise[:, :, c].mean()) * (amplitude + 1e-8) ** noise_q
        texture = np.real(np.fft.ifft2(shaped))
        out[:, :, c][new] = _match_histogram(texture[new], src[:, :, c][known])
    return Image.fromarray(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), "RGB")


@dataclass
class OutpaintPlan:
    request: InpaintRequest
    pixels: int
    directions: list[str]


def arguments(engine: Engine, mode: str) -> list[ScriptArg]:
    return [
        ScriptArg(None, INFO, "html"),
        ScriptArg("Pixels to expand", 128, "slider", 8, 256, 8),
        ScriptArg("Mask blur", 8, "slider", 0, 64, 1),
        ScriptArg("Outpainting direction", list(DIRECTIONS), "checkboxgroup", choices=list(DIRECTIONS)),
        ScriptArg("Fall-off exponent (lower=higher detail)", 1.0, "slider", 0.0, 4.0, 0.01),
        ScriptArg("Color variation", 0.05, "slider", 0.0, 1.0, 0.01),
    ]


def prepare(engine: Engine, request: GenerationRequest, args: list[Any]) -> OutpaintPlan:
    if not isinstance(request, Img2ImgRequest):
        raise RequestError(ARGS_FIELD, f"{TITLE} works on img2img requests (it needs an init image)")
    pixels = int(as_number(arg_at(args, 1, 128), TITLE, 1, "Pixels to expand", 8, 256))
    blur = int(as_number(arg_at(args, 2, 8), TITLE, 2, "Mask blur", 0, 64))
    raw = arg_at(args, 3, list(DIRECTIONS))
    chosen = [raw] if isinstance(raw, str) else list(raw)
    directions = [str(d).strip().lower() for d in chosen if str(d).strip()]
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise bad_arg(TITLE, 3, "Outpainting direction", f"must be a non-empty list of {list(DIRECTIONS)}; got {raw!r}")
    noise_q = as_number(arg_at(args, 4, 1.0), TITLE, 4, "Fall-off exponent", 0.0, 4.0)
    color_variation = as_number(arg_at(args, 5, 0.05), TITLE, 5, "Color variation", 0.0, 1.0)
    values = request_values(request)
    fields = {
        k: v
        for k, v in values.items()
        if k in InpaintRequest.model_fields
        and k not in ("mode", "init_images", "mask", "width", "height", "mask_blur", "inpainting_fill", "resize_mode")
        and k not in InpaintRequest.model_fields.keys() - Img2ImgRequest.model_fields.keys()
    }
    sides = {d: pixels if d in directions else 0 for d in DIRECTIONS}
    seed = resolve_seed(request.seed)
    try:
        multiple = engine.size_multiple(request.model)  # the model's VAE factor
        op = outpaint_canvas(request.init_images[0], blend=blur * 4, multiple=multiple, **sides)
        hard = Image.new("L", op.canvas.size, 255)
        hard.paste(0, op.box)
        canvas = matched_noise(op.canvas, hard, noise_q, color_variation, seed)
        values = {"mask_blur": 0, **fields, "seed": seed}
        values.update(
            init_images=[canvas],
            mask=op.mask,
            inpainting_fill="original",
            width=work_side(canvas.width, multiple),
            height=work_side(canvas.height, multiple),
        )
        inpaint = InpaintRequest.build(**values)
    except RequestError as exc:
        raise RequestError(ARGS_FIELD, f"{TITLE}: {exc.field}: {exc.message}") from None
    return OutpaintPlan(inpaint, pixels, directions)


def run(run_: ScriptRun, request: GenerationRequest, plan: OutpaintPlan) -> GenerationResult:
    run_.total_jobs = plan.request.n_iter
    run_.progress_text(f"{TITLE}: {', '.join(plan.directions)} by {plan.pixels} px")
    res = run_.generate(plan.request)
    extra = {"Outpainting pixels": plan.pixels, "Outpainting direction": " ".join(plan.directions)}
    res = GriddedResult.from_result(res, infotexts=[append_params(t, extra) for t in res.infotexts])
    return with_batch_grid(res, run_.grid, run_.engine.config.outputs_dir, request.mode, request.prompt)


SCRIPT = Script(TITLE, ("img2img",), arguments, prepare, run, aliases=("outpainting",))
