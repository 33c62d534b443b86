"""The options of a video job: `AnimateDiffArgs`, with the names and defaults of sd-webui-animatediff's API
(`alwayson_scripts: {"AnimateDiff": {"args": [{...}]}}`), so clients written for that extension work here.

FreeInit (`freeinit_enable`, `freeinit_filter`, `freeinit_ds`, `freeinit_dt`, `freeinit_iters`, that extension's
names and defaults) re-samples a text-to-video clip from its own low frequencies (`ldm_core.video.free_init`).
Unknown keys that extension accepts (`interp_x`, `request_id`, `is_i2i_batch`, `mask_path`, ...) are accepted
and ignored; values this engine cannot honour are accepted and reported in the job's `info`:
FILM frame interpolation (`interp: "FILM"`) needs Deforum's model, and `video_path` (a folder on the server)
is not read (send the clip as `video_source`).

`shared_noise` is this engine's own option (sd-webui-animatediff has none; ComfyUI's AnimateDiff-Evolved mixes
noise layers in the same spirit): the share of each frame's starting noise taken from the first frame's, by the
variation-seed blend (`ldm_core.rng.slerp`). 0 keeps the frames' noises independent, as every AnimateDiff tool
does; above it the frames start alike, so they agree on what the object is, and the motion module has to move it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .free_init import FILTERS as FREEINIT_FILTERS

#: the timeline's option names, in the order the command lines take them (START END EFFECT), and the defaults
TIMELINE = ("motion_start_percent", "motion_end_percent", "motion_effect")
TIMELINE_DEFAULT = (0.0, 1.0, 1.0)


def add_timeline_argument(parser, *flags: str) -> None:
    """`--motion-timeline START END EFFECT` (and `flags` as aliases) on an argparse parser; `timeline_options`
    turns its value into the AnimateDiff options."""
    parser.add_argument(
        "--motion-timeline",
        *flags,
        dest="motion_timeline",
        type=float,
        nargs=3,
        default=TIMELINE_DEFAULT,
        metavar=("START", "END", "EFFECT"),
        help="the motion module runs from START to END of the denoising (0: noise, 1: clean) and keeps EFFECT of "
        "its change (default: 0 1 1)",
    )


def timeline_options(values) -> dict[str, float]:
    """{motion_start_percent, motion_end_percent, motion_effect} from (START, END, EFFECT)."""
    return dict(zip(TIMELINE, (float(v) for v in values), strict=True))


VIDEO_FORMATS = ("GIF", "MP4", "WEBP", "WEBM", "PNG", "TXT", "Frame")
MAX_FRAMES = 128  # frames of one clip (the UI slider's range; a server may lower it)


class AnimateDiffArgs(BaseModel):
    """One video job's options (see the module doc). `video_length` 0 means: the source clip's length when one
    is given, else `batch_size` (the context)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    enable: bool = True
    model: str | None = None  # a motion module in models/AnimateDiff; None = the first one there
    video_length: int = Field(16, ge=0, le=MAX_FRAMES)
    fps: float = Field(8, gt=0, le=120)
    loop_number: int = Field(0, ge=0)  # times a GIF/WebP plays; 0 = forever
    closed_loop: Literal["N", "R-P", "R+P", "A"] = "R-P"
    batch_size: int = Field(16, ge=1, le=MAX_FRAMES)  # context: frames the motion module sees at once
    stride: int = Field(1, ge=1, le=64)
    overlap: int = Field(-1, ge=-1)  # -1: batch_size // 4
    format: list[str] = Field(default_factory=lambda: ["GIF", "PNG"])
    interp: str = "Off"
    video_source: Any = None  # a clip (base64 or bytes; GIF/WebP/MP4/WebM) for video-to-video
    video_path: str | None = None
    shared_noise: float = Field(0.0, ge=0.0, le=1.0)  # share of each frame's noise from the first frame's
    # the motion module's timeline (AnimateDiff-Evolved's start/end percent and effect): it runs from
    # motion_start_percent to motion_end_percent of the denoising (0: pure noise, 1: the clean end) and keeps
    # motion_effect of the change its temporal layers make; outside that span the base UNet runs alone
    motion_start_percent: float = Field(0.0, ge=0.0, le=1.0)
    motion_end_percent: float = Field(1.0, ge=0.0, le=1.0)
    motion_effect: float = Field(1.0, ge=0.0, le=2.0)
    freeinit_enable: bool = False  # text-to-video only (ldm_core.video.free_init)
    freeinit_filter: Literal[FREEINIT_FILTERS] = "butterworth"
    freeinit_ds: float = Field(0.25, gt=0.0, le=1.0)  # spatial stop frequency
    freeinit_dt: float = Field(0.25, gt=0.0, le=1.0)  # temporal stop frequency
    freeinit_iters: int = Field(3, ge=1, le=10)  # samplings in all, the first from plain noise
    latent_power: float = 1.0  # image-to-video: frame i keeps 1 - i**latent_power / latent_scale of the image
    latent_scale: float = Field(32.0, gt=0)
    last_frame: Any = None  # image-to-video: an image the clip ends on
    latent_power_last: float = 1.0
    latent_scale_last: float = Field(32.0, gt=0)
    # Stable Video Diffusion folders only (ldm_core.video.svd)
    motion_bucket_id: int = Field(127, ge=0, le=1023)  # more motion above 127
    noise_aug_strength: float = Field(0.02, ge=0.0, le=1.0)  # noise added to the start image

    @field_validator("format", mode="before")
    @classmethod
    def _formats(cls, v):
        if isinstance(v, str):
            v = [v]
        out = []
        for f in v or []:
            name = {
                "GIF": "GIF",
                "MP4": "MP4",
                "WEBP": "WEBP",
                "WEBM": "WEBM",
                "PNG": "PNG",
                "TXT": "TXT",
                "FRAME": "Frame",
                "FRAMES": "Frame",
            }.get(str(f).strip().upper())
            if name is None:
                raise ValueError(f"unknown format {f!r}: choose from {', '.join(VIDEO_FORMATS)}")
            if name not in out:
                out.append(name)
        return out

    @field_validator("closed_loop", mode="before")
    @classmethod
    def _closed_loop(cls, v):
        if isinstance(v, bool):  # older clients send a checkbox
            return "R-P" if v else "N"
        return v

    @model_validator(mode="after")
    def _timeline(self):
        if self.motion_end_percent < self.motion_start_percent:
            raise ValueError(
                f"motion_end_percent {self.motion_end_percent:g} is before motion_start_percent "
                f"{self.motion_start_percent:g}: the end must be at or after the start (0..1)"
            )
        return self

    def frames(self, source_frames: int | None = None) -> int:
        if self.video_length:
            return self.video_length
        return source_frames or self.batch_size

    @property
    def closed(self) -> bool:
        return self.closed_loop != "N"

    @property
    def files(self) -> list[str]:
        """The video files to write, in the order asked."""
        return [f for f in self.format if f in ("GIF", "MP4", "WEBP", "WEBM")]


def number_kind(name: str) -> type | None:
    """`int` or `float` for a numeric field of `AnimateDiffArgs` (a form's value or an infotext's text is
    converted to it), None for any other field."""
    field = AnimateDiffArgs.model_fields.get(name)
    return field.annotation if field is not None and field.annotation in (int, float) else None
