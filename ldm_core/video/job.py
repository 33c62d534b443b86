"""What the engine needs to run one txt2img/img2img job as a clip (frames as the batch through the same loop).

`plan_video` checks the request's `AnimateDiffArgs` against the model and the installed motion modules and
returns a `VideoPlan`: the module, the frame count, the context windows, the source clip for video-to-video,
the frame rate and the notes for `info`. The engine then patches the module into the UNet for the job
(`motion_patch`), runs the loop through `VideoPlan.unet(...)`, builds init latents with `init_latents(...)`,
and writes the clip files with `write_clips(...)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image

from ..generation_requests import GenerationRequest, Img2ImgRequest, RequestError
from ..infotext import infotext_number
from ..outputs import encode_png_bytes, output_folder, save_bytes
from ..prompts.networks import LORA_KINDS
from ..prompts.parser import ExtraNetworkCall
from ..rng import towards_first
from .clips import CLIP_TYPES, ClipError, decode_clip, encode_clip
from .context_windows import ContextWindowUNet, context_windows
from .motion_modules import MotionModule, MotionModuleError, MotionModules, MotionPatch, check_fits
from .options import MAX_FRAMES, TIMELINE_DEFAULT, AnimateDiffArgs

log = logging.getLogger(__name__)
FIELD = "animatediff"  # how errors name the options (alwayson_scripts.AnimateDiff.args[0] in A1111 clients)


@dataclass
class ClipFile:
    """One written clip: format (GIF/MP4/WEBP/WEBM), its bytes, MIME type and saved path (None: not saved)."""

    format: str
    data: bytes
    mime: str
    path: Path | None = None


@dataclass
class VideoPlan:
    args: AnimateDiffArgs
    module: MotionModule | None  # None: a Stable Video Diffusion job (ldm_core.video.svd)
    frames: int
    context: int
    windows: list[list[int]]
    fps: float
    source: list[Image.Image] | None = None  # video-to-video: one init image per frame
    notes: list[str] = field(default_factory=list)
    patch: MotionPatch | None = None
    image_start: bool = False  # image-to-video (img2img from one start image)

    @property
    def travel_closed(self) -> bool:
        """Whether prompt travel wraps from the last keyframe back to the first (A1111's R+P and A)."""
        return self.args.closed_loop in ("R+P", "A")

    def unet(self, unet, train_timesteps: int = 1000) -> ContextWindowUNet:
        if self.patch is None:
            raise RuntimeError("the motion module is not patched into the UNet")
        patch, a = self.patch, self.args

        def at_timestep(t) -> None:  # the module's effect on this call, by where t sits in the denoising
            done = 1.0 - float(t.flatten()[0] if torch.is_tensor(t) else t) / train_timesteps
            inside = a.motion_start_percent <= done <= a.motion_end_percent
            patch.effect = a.motion_effect if inside else 0.0

        return ContextWindowUNet(unet, self.frames, self.windows, patch.set_frames, at_timestep)

    def with_adapter_lora(self, networks: list[ExtraNetworkCall], installed: Iterable[str]) -> list[ExtraNetworkCall]:
        """The job's LoRA calls plus the module's adapter LoRA (its sidecar's `adapter_lora`) at weight 1,
        unless the prompt names that LoRA already (at any weight: `<lora:NAME:0>` leaves it out) or it is not
        installed; `notes` says which."""
        name = self.module.adapter_lora if self.module is not None else None
        if name is None or any(c.kind in LORA_KINDS and c.name.lower() == name.lower() for c in networks):
            return networks
        if name.lower() not in {n.lower() for n in installed}:
            self.notes.append(
                f"motion module {self.module.name}: its adapter LoRA {name!r} is not in the LoRA folder; the clip "
                "ran without it"
            )
            return networks
        self.notes.append(
            f"added <lora:{name}:1>, the adapter LoRA of motion module {self.module.name} (name it in the prompt "
            "with another weight to change that)"
        )
        return [*networks, ExtraNetworkCall("lora", name, ("1",), tag=f"<lora:{name}:1>")]

    def infotext(self) -> str:
        a = self.args
        overlap = self.context // 4 if a.overlap < 0 else a.overlap
        return (
            f"model: {self.module.name}, video_length: {self.frames}, fps: {infotext_number(self.fps)}, "
            f"closed_loop: {a.closed_loop}, batch_size: {self.context}, stride: {a.stride}, overlap: {overlap}"
            + (f", shared_noise: {infotext_number(a.shared_noise)}" if a.shared_noise > 0 else "")
            + (
                f", motion_start_percent: {infotext_number(a.motion_start_percent)}, "
                f"motion_end_percent: {infotext_number(a.motion_end_percent)}, "
                f"motion_effect: {infotext_number(a.motion_effect)}"
                if (a.motion_start_percent, a.motion_end_percent, a.motion_effect) != TIMELINE_DEFAULT
                else ""
            )
            + (
                f", freeinit_iters: {self.free_init_passes}, freeinit_filter: {a.freeinit_filter}, "
                f"freeinit_ds: {infotext_number(a.freeinit_ds)}, freeinit_dt: {infotext_number(a.freeinit_dt)}"
                if self.free_init_passes > 1
                else ""
            )
        )

    @property
    def free_init_passes(self) -> int:
        """Samplings of this clip: FreeInit's iterations for text-to-video, else 1."""
        a = self.args
        return a.freeinit_iters if a.freeinit_enable and self.source is None and not self.image_start else 1

    def starting_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The frames' starting noise (F,C,H,W): each frame's own noise blended towards the first frame's by
        `shared_noise` (the variation-seed slerp, so each frame's noise keeps the statistics of one draw)."""
        return towards_first(noise, self.args.shared_noise)


def plan_video(request: GenerationRequest, modules: MotionModules, unet, model_name: str, family: str):
    """The VideoPlan of `request`, or None when it asks for no clip. RequestError names the bad option."""
    args = request.animatediff
    if args is None or not args.enable:
        return None
    name = args.model or modules.default()
    if name is None:
        where = ", ".join(str(d) for d in modules.dirs)
        raise RequestError(f"{FIELD}.model", f"no motion module is installed: put one in {where}")
    try:
        module = modules.load(name)
        check_fits(module, unet, model_name, family)
    except MotionModuleError as e:
        raise RequestError(f"{FIELD}.model", str(e)) from None
    notes = []
    source = None
    fps = args.fps
    if args.video_source:
        if not isinstance(request, Img2ImgRequest):
            raise RequestError(f"{FIELD}.video_source", "a source clip is for img2img (video-to-video)")
        try:
            clip = decode_clip(args.video_source, max_frames=args.video_length or MAX_FRAMES)
        except ClipError as e:
            raise RequestError(f"{FIELD}.video_source", str(e)) from None
        source = clip.frames
        if clip.fps:
            fps = clip.fps  # A1111's extension: the source's frame rate
    elif isinstance(request, Img2ImgRequest) and len(request.init_images) > 1:
        source = list(request.init_images)  # several init images: one per frame
    if args.video_path:
        notes.append("AnimateDiff video_path: not read (send the clip as video_source)")
    if args.interp and args.interp != "Off":
        notes.append(f"AnimateDiff interp {args.interp}: not applied (no frame interpolation model offline)")
    image_start = isinstance(request, Img2ImgRequest) and source is None
    if args.freeinit_enable and (source is not None or image_start):
        notes.append("AnimateDiff FreeInit: text-to-video only, not applied to a clip from an image or a clip")
    frames = args.frames(len(source) if source else None)
    context = args.batch_size
    if context > module.max_frames:
        notes.append(
            f"AnimateDiff batch_size {context}: {module.name} covers at most {module.max_frames} frames at once; "
            f"{module.max_frames} used"
        )
        context = module.max_frames
    if args.closed_loop == "A" and frames <= context:
        notes.append("AnimateDiff closed_loop A: the clip fits one context window, so nothing loops it")
    windows = context_windows(frames, context, args.stride, args.overlap, args.closed)
    return VideoPlan(args, module, frames, context, windows, fps, source, notes, image_start=image_start)


def _alphas(n: int, power: float, scale: float) -> torch.Tensor:
    return torch.tensor([max(0.0, 1 - i**power / scale) for i in range(n)]).view(-1, 1, 1, 1)


def blend_image_to_video(
    init: torch.Tensor, noise: torch.Tensor, args: AnimateDiffArgs, last: torch.Tensor | None = None
) -> torch.Tensor:
    """Image-to-video as sd-webui-animatediff does it: frame i's init latents keep 1 - i**latent_power /
    latent_scale of the image (at least 0) and take noise for the rest; with a last frame, the last frames keep
    a share of it counted from the end, and where both shares add up to more than 1 they are scaled to 1."""
    n = init.shape[0]
    a = _alphas(n, args.latent_power, args.latent_scale).to(init)
    if last is None:
        return init * a + noise * (1 - a)
    b = _alphas(n, args.latent_power_last, args.latent_scale_last).flip(0).to(init)
    total = a + b
    over = total > 1
    a = torch.where(over, a / total, a)
    b = torch.where(over, b / total, b)
    return init * a + last * b + noise * (1 - a - b)


def write_clips(
    plan: VideoPlan,
    frames: list[Image.Image],
    infotext: str,
    manifest: dict,
    *,
    save: bool,
    outputs_dir: Path,
    seed: int,
    pattern: str,
    model_name: str,
    prompt: str,
    writer=None,
) -> tuple[list[ClipFile], list[Path]]:
    """Encode the clip in each asked format and, when `save`, write it (and PNG frames / a TXT file when
    asked) atomically under `outputs/video/<date>/`. Returns (clips, saved frame and text paths)."""
    folder = output_folder(outputs_dir, "video")
    when = datetime.now()
    clips, extra = [], []
    common = dict(seed=seed, pattern=pattern, model_name=model_name, prompt=prompt, when=when, writer=writer)
    for fmt in plan.args.files:
        ext, mime = CLIP_TYPES[fmt]
        try:
            data = encode_clip(frames, fmt, plan.fps, infotext=infotext, loop=plan.args.loop_number)
        except ClipError as e:
            raise RequestError(f"{FIELD}.format", str(e)) from None
        path = save_bytes(data, folder, ext, **common) if save else None
        clips.append(ClipFile(fmt, data, mime, path))
    if save and "PNG" in plan.args.format:
        for i, im in enumerate(frames):
            extra.append(save_bytes(encode_png_bytes(im, infotext, {**manifest, "frame": i}), folder, "png", **common))
    if save and "TXT" in plan.args.format:
        extra.append(save_bytes(infotext.encode("utf-8"), folder, "txt", **common))
    return clips, extra
