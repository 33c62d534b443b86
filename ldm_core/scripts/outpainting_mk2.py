"""The Outpainting mk2 script (img2img): grow the canvas by some pixels in the chosen directions and
inpaint the new area (`pipeline.outpaint`); a grid first when several images are made.

`script_args` (A1111's order): info (an HTML note, any value), pixels (8..256), mask_blur (0..64),
direction (a list of "left", "right", "up", "down"), noise_q, color_variation. The new area starts from
colours diffused in from the image's edges; noise_q and color_variation (A1111's matched-noise fill) are
accepted and checked but this fill does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Engine, GenerationResult
from ..grids import GriddedResult, append_params, with_batch_grid
from ..pipeline.outpaint import outpaint_request
from ..requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from .base import ARGS_FIELD, Script, ScriptArg, ScriptRun, arg_at, as_number, bad_arg, request_values

TITLE = "Outpainting mk2"
DIRECTIONS = ("left", "right", "up", "down")
INFO = "Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8"


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
    as_number(arg_at(args, 4, 1.0), TITLE, 4, "Fall-off exponent", 0.0, 4.0)
    as_number(arg_at(args, 5, 0.05), TITLE, 5, "Color variation", 0.0, 1.0)
    values = request_values(request)
    fields = {
        k: v
        for k, v in values.items()
        if k in InpaintRequest.model_fields
        and k not in ("mode", "init_images", "mask", "width", "height", "mask_blur", "inpainting_fill", "resize_mode")
        and k not in InpaintRequest.model_fields.keys() - Img2ImgRequest.model_fields.keys()
    }
    sides = {d: pixels if d in directions else 0 for d in DIRECTIONS}
    try:
        op = outpaint_request(request.init_images[0], blend=blur * 4, **sides, **fields)
    except RequestError as exc:
        raise RequestError(ARGS_FIELD, f"{TITLE}: {exc.field}: {exc.message}") from None
    return OutpaintPlan(op, pixels, directions)


def run(run_: ScriptRun, request: GenerationRequest, plan: OutpaintPlan) -> GenerationResult:
    run_.total_jobs = plan.request.n_iter
    run_.progress_text(f"{TITLE}: {', '.join(plan.directions)} by {plan.pixels} px")
    res = run_.generate(plan.request)
    extra = {"Outpainting pixels": plan.pixels, "Outpainting direction": " ".join(plan.directions)}
    res = GriddedResult.from_result(res, infotexts=[append_params(t, extra) for t in res.infotexts])
    return with_batch_grid(res, run_.grid, run_.engine.config.outputs_dir, request.mode, request.prompt)


SCRIPT = Script(TITLE, ("img2img",), arguments, prepare, run, aliases=("outpainting",))
