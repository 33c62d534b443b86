"""Clip files: encode frames as animated GIF and WebP (Pillow) and as MP4 (H.264) and WebM (VP9) through PyAV,
whose wheel ships FFmpeg with those encoders; decode a clip a user sends (GIF, WebP, MP4, WebM, ...) to frames.

Every file carries the job's infotext where the format has room for text: the GIF comment, the WebP's EXIF
UserComment (as our still images), the MP4/WebM container's `comment` tag, and each PNG frame's "parameters"
chunk. PNG Info reads the GIF and WebP ones back (`ldm_core.outputs.read_image_info`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image, ImageSequence

from ..outputs import exif_bytes

#: format name -> (file extension, MIME type)
CLIP_TYPES = {
    "GIF": ("gif", "image/gif"),
    "WEBP": ("webp", "image/webp"),
    "MP4": ("mp4", "video/mp4"),
    "WEBM": ("webm", "video/webm"),
}


class ClipError(ValueError):
    """A clip cannot be written or read; the message says why."""


def _duration_ms(fps: float) -> int:
    return max(10, round(1000 / fps))


def encode_clip(frames: Sequence[Image.Image], fmt: str, fps: float, *, infotext: str = "", loop: int = 0) -> bytes:
    """The bytes of a clip file of `frames` in `fmt` (a key of CLIP_TYPES) at `fps`; `loop` is how many times
    a GIF/WebP plays (0: forever)."""
    if not frames:
        raise ClipError("a clip needs at least one frame")
    rgb = [f.convert("RGB") for f in frames]
    buf = io.BytesIO()
    if fmt == "GIF":
        rgb[0].save(
            buf,
            "GIF",
            save_all=True,
            append_images=rgb[1:],
            duration=_duration_ms(fps),
            loop=loop,
            comment=infotext.encode("utf-8"),
            optimize=False,
            disposal=1,
        )
    elif fmt == "WEBP":
        rgb[0].save(
            buf,
            "WEBP",
            save_all=True,
            append_images=rgb[1:],
            duration=_duration_ms(fps),
            loop=loop,
            quality=90,
            exif=exif_bytes(infotext, None),
        )
    elif fmt in ("MP4", "WEBM"):
        return _encode_av(rgb, fmt, fps, infotext)
    else:
        raise ClipError(f"unknown clip format {fmt!r}; choose from {', '.join(CLIP_TYPES)}")
    return buf.getvalue()


def _encode_av(frames: list[Image.Image], fmt: str, fps: float, infotext: str) -> bytes:
    import av

    codec, pix = ("libx264", "yuv420p") if fmt == "MP4" else ("libvpx-vp9", "yuv420p")
    buf = io.BytesIO()
    w, h = frames[0].size
    # yuv420p needs even sides: pad by one pixel (edge copy) rather than scale
    ew, eh = w + (w % 2), h + (h % 2)
    with av.open(buf, "w", format="mp4" if fmt == "MP4" else "webm") as out:
        if infotext:
            out.metadata["comment"] = infotext
        try:
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        except Exception as e:  # an FFmpeg build without the encoder
            raise ClipError(f"{fmt}: this PyAV/FFmpeg build has no {codec} encoder ({e})") from None
        stream.width, stream.height, stream.pix_fmt = ew, eh, pix
        if fmt == "MP4":
            stream.options = {"crf": "18", "preset": "medium"}
        for im in frames:
            a = np.asarray(im)
            if (ew, eh) != (w, h):
                a = np.pad(a, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@dataclass
class Clip:
    frames: list[Image.Image]
    fps: float | None


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    if isinstance(data, str):
        text = data.strip()
        if text.startswith("data:"):
            text = text.split(",", 1)[-1]
        try:
            return base64.b64decode(text, validate=False)
        except (ValueError, TypeError):
            raise ClipError("not base64 data of a clip") from None
    raise ClipError(f"a clip must be base64 text or bytes, not {type(data).__name__}")


def decode_clip(data, *, max_frames: int | None = None) -> Clip:
    """The frames (RGB) and frame rate of a clip given as bytes or base64 (a data: URL too)."""
    raw = _as_bytes(data)
    if not raw:
        raise ClipError("the clip is empty")
    try:
        im = Image.open(io.BytesIO(raw))
        frames, fps = [], None
        for i, frame in enumerate(ImageSequence.Iterator(im)):
            if max_frames is not None and i >= max_frames:
                break
            frames.append(frame.convert("RGB"))
            if fps is None and frame.info.get("duration"):
                fps = 1000.0 / float(frame.info["duration"])
        if frames:
            return Clip(frames, fps)
    except (OSError, ValueError, Image.DecompressionBombError):
        pass  # not an image format Pillow reads: try FFmpeg
    import av

    try:
        with av.open(io.BytesIO(raw)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise ClipError("the file has no video stream")
            rate = stream.average_rate or stream.guessed_rate
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_image().convert("RGB"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except ClipError:
        raise
    except Exception as e:  # PyAV raises its own error types for unreadable data
        raise ClipError(f"cannot read the clip: {e}") from None
    if not frames:
        raise ClipError("the clip has no frames")
    return Clip(frames, float(rate) if rate else None)


def read_source_clip(path) -> tuple[bytes, Image.Image]:
    """A video-to-video source clip from a file: its bytes and its first frame (the start image when none is
    given). An unreadable file is a RequestError naming `video_source`."""
    from pathlib import Path

    from ..generation_requests import RequestError

    try:
        data = Path(path).read_bytes()
        return data, decode_clip(data, max_frames=1).frames[0]
    except (OSError, ClipError) as exc:
        raise RequestError("video_source", f"cannot read {Path(path).name}: {exc}") from None
