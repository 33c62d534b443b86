"""The SD upscale script (img2img): upscale the init image with an upscaler, redraw it tile by tile with
img2img (tile size = the request's width x height) and blend the tiles (`pipeline.sd_upscale`).

`script_args` (A1111's order): info (an HTML note, any value), overlap (px), upscaler_index (an index into
/sdapi/v1/upscalers, or the upscaler's name), scale_factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ..grids import GriddedResult, append_params
from ..outputs import output_folder, save_image
from ..pipeline.sd_upscale import sd_upscale
from ..rng import resolve_seed
from .base import ARGS_FIELD, Script, ScriptArg, ScriptRun, arg_at, as_choice, as_number, rebuild

TITLE = "SD upscale"
INFO = "Will upscale the image by the selected scale factor; use width and height sliders to set tile size"


@dataclass
class UpscalePlan:
    request: Img2ImgRequest
    upscaler: str
    scale: float
    overlap: int
    warning: str | None = None  # the upscaler asked for is not here: which one ran instead


def arguments(engine: Engine, mode: str) -> list[ScriptArg]:
    names = engine.upscalers.names()
    return [
        ScriptArg(None, INFO, "html"),
        ScriptArg("Tile overlap", 64, "slider", 0, 256, 16),
        ScriptArg("Upscaler", names[0] if names else "None", "radio", choices=names),
        ScriptArg("Scale Factor", 2.0, "slider", 1.0, 4.0, 0.05),
    ]


def prepare(engine: Engine, request: GenerationRequest, args: list[Any]) -> UpscalePlan:
    if not isinstance(request, Img2ImgRequest) or isinstance(request, InpaintRequest):
        raise RequestError(ARGS_FIELD, f"{TITLE} works on img2img requests (an init image and no mask)")
    overlap = int(as_number(arg_at(args, 1, 64), TITLE, 1, "Tile overlap", 0, 256))
    asked = arg_at(args, 2, 0)
    names = engine.upscalers.names()
    warning = None
    if isinstance(asked, str) and not asked.strip().isdigit() and asked.strip().lower() not in map(str.lower, names):
        # a model upscaler name this server lacks ("R-ESRGAN 4x+") falls back with a warning, as for hires
        fallback = engine.upscalers.fallback(asked, ARGS_FIELD)
        upscaler, warning = fallback.name, fallback.warning
    else:
        upscaler = as_choice(asked, names, TITLE, 2, "Upscaler")
    scale = as_number(arg_at(args, 3, 2.0), TITLE, 3, "Scale Factor", 1.0, 8.0)
    fixed = rebuild(request, seed=resolve_seed(request.seed))
    return UpscalePlan(fixed, upscaler, 1.0 if upscaler == "None" else scale, overlap, warning)  # type: ignore[arg-type]


def run(run_: ScriptRun, request: GenerationRequest, plan: UpscalePlan) -> GenerationResult:
    req = plan.request
    template: list[GenerationResult] = []

    def generate(tile_request):
        res = run_.generate(tile_request)
        template.append(res)
        return res

    def progress(done: int, total: int) -> None:
        run_.progress_text(f"{TITLE}: tile {done} of {total}")

    run_.total_jobs = 1
    out = sd_upscale(
        req, generate, run_.engine.upscalers, upscaler=plan.upscaler, scale=plan.scale, overlap=plan.overlap,
        progress=progress, multiple=run_.engine.size_multiple(req.model), cancel=run_.ctx.cancel.check,
    )  # fmt: skip
    extra = {"SD upscale overlap": plan.overlap, "SD upscale upscaler": plan.upscaler}
    infos = [append_params(t, extra) for t in out.infotexts]
    paths = []
    if req.save_images and run_.save_singles and out.images:
        folder = output_folder(run_.engine.config.outputs_dir, "img2img")
        for im, text, seed in zip(out.images, infos, out.seeds, strict=True):
            paths.append(
                save_image(
                    im,
                    folder,
                    infotext=text,
                    manifest=None,
                    seed=seed,
                    pattern=run_.engine.config.filename_pattern,
                    extension=run_.engine.config.samples_format,
                    quality=run_.engine.config.jpeg_quality,
                    prompt=req.prompt,
                )
            )
    base = template[0] if template else GenerationResult()
    return GriddedResult.from_result(
        base,
        images=out.images,
        infotexts=infos,
        seeds=out.seeds,
        subseeds=[-1] * len(out.images),
        manifests=[{}] * len(out.images),
        paths=paths,
        interrupted=out.interrupted or run_.interrupted,
        width=out.images[0].width if out.images else 0,
        height=out.images[0].height if out.images else 0,
        warnings=[*base.warnings, *([plan.warning] if plan.warning else [])],
    )


SCRIPT = Script(TITLE, ("img2img",), arguments, prepare, run)
