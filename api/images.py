"""Images over HTTP: base64 decoding (bare or `data:` URL) and PNG encoding with the infotext.

A1111 clients send images as bare base64 or as `data:image/png;base64,...` and read back bare base64 PNGs.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from ldm_core.generation_requests import RequestError
from ldm_core.outputs import encode_png_bytes

_DATA_URL_RE = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def decode_image(data: str, field: str) -> Image.Image:
    """A PIL image from base64 text (with or without a `data:...;base64,` prefix); RequestError(field) if
    the text is not base64 or not an image PIL can read."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(field, "must be a base64-encoded image")
    text = _DATA_URL_RE.sub("", data.strip(), count=1)
    text = "".join(text.split())  # tolerate line-wrapped base64
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise RequestError(field, f"cannot decode image: {exc}") from None


def encode_png_b64(image: Image.Image, infotext: str | None = None, manifest: dict | None = None) -> str:
    """Bare base64 of a PNG; `infotext` goes into the "parameters" chunk as when saved to disk."""
    if infotext is None and manifest is None:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = encode_png_bytes(image, infotext or "", manifest)
    return base64.b64encode(data).decode("ascii")


def encode_preview_b64(image: Image.Image) -> str:
    """Bare base64 of a live preview (a plain PNG, no metadata)."""
    return encode_png_b64(image.convert("RGB"))
