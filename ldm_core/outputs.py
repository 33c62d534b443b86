"""Saving generated images: A1111-style file names, infotext and manifest embedded, atomic, never overwriting.

Files go to `outputs/<mode>/<YYYY-MM-DD>/NNNNN-<seed>.png`. PNGs carry the infotext as the text chunk
"parameters" (what A1111 writes) and our reproducibility manifest as a compressed iTXt chunk "ldm_manifest"
(JSON). JPEG and WebP carry the infotext in the EXIF UserComment (UNICODE-prefixed UTF-16, as A1111 writes
it) and the manifest as JSON in the EXIF MakerNote.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin
from PIL.ExifTags import IFD, Base

MANIFEST_KEY = "ldm_manifest"
PARAMETERS_KEY = "parameters"
EXTENSIONS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_NAME_CHARS = 150  # file name stem, before the extension
PROMPT_WORDS_CHARS = 64

_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_EXIF_LIMIT = 65000  # a JPEG APP1 segment holds at most 64 KiB
# image.info entries that are format details, not text chunks (not reported as "other chunks")
_NOT_TEXT = {
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop", "gamma", "srgb",
    "transparency", "aspect", "xmp", "adobe", "adobe_transform",
}  # fmt: skip
_NUMBER_RE = re.compile(r"^(\d+)")
_BAD_CHARS_RE = re.compile(r'[\x00-\x1f<>:"/\\|?*\x7f]+')


# ---- writing, and the disk-full fault hook (issue 16) -------------------------------------------------------
#: How a finished image's bytes go into its open temp file. `save_image` takes one (`writer=`), the engine
#: passes `EngineConfig.output_writer`: the default `write_durably`; tests inject `disk_full_writer(...)`.
Writer = Callable[[BinaryIO, bytes], None]
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """Saving failed because the disk (or the user's quota) is full. No partial file is left behind and no
    existing file was touched; the message names the folder."""


def write_durably(f: BinaryIO, data: bytes) -> None:
    """The default writer: write, flush and fsync (the file is on disk before it gets its name)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def disk_full_writer(after_bytes: int = 0) -> Writer:
    """A fault-injection writer that behaves like a full disk: it writes the first `after_bytes` bytes, then
    fails with ENOSPC, as `write()` does when the file system runs out of space mid-file."""

    def write(f: BinaryIO, data: bytes) -> None:
        f.write(data[:after_bytes])
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def output_folder(outputs_dir: Path, mode: str, when: datetime | None = None) -> Path:
    """`outputs_dir/<mode>/<YYYY-MM-DD>` for images made at `when` (default: now). Does not create it."""
    if not mode or _sanitize(mode) != mode or mode in (".", ".."):
        raise ValueError(f"mode {mode!r} is not a plain folder name")
    return Path(outputs_dir) / mode / (when or datetime.now()).strftime("%Y-%m-%d")


def _sanitize(text: str) -> str:
    """`text` made safe inside a file name: no path separators, control or reserved characters."""
    return _BAD_CHARS_RE.sub("_", text).strip()


def _prompt_words(prompt: str, limit: int = PROMPT_WORDS_CHARS) -> str:
    """The prompt's leading words (no brackets, weights or <lora:...> tags), joined by spaces, <= limit."""
    text = re.sub(r"<[^>]*>", " ", prompt)
    words = re.findall(r"[^\W_]+(?:[-'][^\W_]+)*", text)
    out = ""
    for word in words:
        if re.fullmatch(r"\d+(\.\d+)?", word):  # weights such as the 1.2 of (cat:1.2)
            continue
        candidate = f"{out} {word}" if out else word
        if len(candidate) > limit:
            break
        out = candidate
    return out


def _file_stem(pattern: str, number: int | None, seed: int, when: datetime, model_name: str, prompt: str) -> str:
    values = {
        "[number]": f"{number:05d}" if number is not None else "",
        "[seed]": str(seed),
        "[date]": when.strftime("%Y-%m-%d"),
        "[model_name]": _sanitize(model_name),
        "[prompt_words]": _sanitize(_prompt_words(prompt)),
    }
    stem = re.sub(r"\[[a-z_]+\]", lambda m: values.get(m.group(0), m.group(0)), pattern)
    stem = _sanitize(stem).lstrip(".-_ ")[:MAX_NAME_CHARS].rstrip(". ")
    return stem or (f"{number:05d}" if number is not None else str(seed))


def _next_number(folder: Path) -> int:
    """1 + the largest leading number of any file name in `folder` (0 when none)."""
    best = -1
    with os.scandir(folder) as entries:
        for entry in entries:
            m = _NUMBER_RE.match(entry.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def _number_taken(folder: Path, number: int) -> bool:
    with os.scandir(folder) as entries:
        return any((m := _NUMBER_RE.match(e.name)) and int(m.group(1)) == number for e in entries)


def _publish(tmp: Path, target: Path) -> bool:
    """Give the finished temp file its final name unless that name exists. True on success."""
    try:
        os.link(tmp, target)  # atomic and fails if target exists
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: reserve the name, then replace it
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, target)
        return True
    os.unlink(tmp)
    return True


def exif_bytes(infotext: str, manifest: dict | None) -> bytes:
    exif = Image.Exif()
    sub = exif.get_ifd(IFD.Exif)
    sub[Base.UserComment] = _UNICODE_PREFIX + infotext.encode("utf-16-be")
    if manifest is not None:
        sub[Base.MakerNote] = json.dumps(manifest, sort_keys=True).encode("utf-8")
    data = exif.tobytes()
    if len(data) > _EXIF_LIMIT and manifest is not None:
        return exif_bytes(infotext, None)  # the manifest does not fit beside the infotext: keep the infotext
    return data


def _encode(image: Image.Image, fmt: str, infotext: str, manifest: dict | None, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, infotext)  # tEXt (iTXt when the text is not Latin-1)
        if manifest is not None:
            info.add_itxt(MANIFEST_KEY, json.dumps(manifest, sort_keys=True), zip=True)
        image.save(buf, "PNG", pnginfo=info)
    else:
        if fmt == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        options = {"quality": quality} if fmt == "JPEG" else {"quality": quality, "lossless": False}
        image.save(buf, fmt, exif=exif_bytes(infotext, manifest), **options)
    return buf.getvalue()


def encode_png_bytes(image: Image.Image, infotext: str, manifest: dict | None) -> bytes:
    """The PNG file bytes (with the "parameters" and manifest chunks) that `save_image` would write."""
    return _encode(image, "PNG", infotext, manifest)


def save_image(
    image: Image.Image,
    folder: Path,
    *,
    infotext: str,
    manifest: dict | None,
    seed: int,
    pattern: str = "[number]-[seed]",
    extension: str = "png",
    model_name: str = "",
    prompt: str = "",
    when: datetime | None = None,
    quality: int = 80,
    writer: Writer | None = None,
) -> Path:
    """Write `image` into `folder` (created if missing) and return the new file's path.

    The name follows `pattern`, whose tokens are [number] (next free 5-digit number in the folder), [seed],
    [date] (YYYY-MM-DD of `when`), [model_name] and [prompt_words] (leading words of `prompt`, <= 64 chars);
    the result is sanitised (no path separators) and capped at 150 characters. The file is written to a
    temp file in `folder` and then linked to its final name, so readers never see a partial file and an
    existing file is never overwritten: when the name is taken the next number is used (or, for a pattern
    without [number], a "-1", "-2", ... suffix). Safe when several threads or processes save into one folder.
    `extension` is png, jpg/jpeg or webp; `quality` (1..100) is the JPEG/WebP quality (A1111's jpeg_quality).
    `writer` puts the bytes into the temp file (default `write_durably`). A full disk raises `DiskFull`
    naming the folder, after removing the temp file: no partial file is ever left or named.
    """
    ext = extension.lower().lstrip(".")
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise ValueError(f"extension {extension!r} is not supported; choose one of {sorted(EXTENSIONS)}")
    data = _encode(image, fmt, infotext, manifest, quality=max(1, min(100, int(quality))))
    return save_bytes(
        data, folder, ext, seed=seed, pattern=pattern, model_name=model_name, prompt=prompt, when=when, writer=writer
    )


def save_bytes(
    data: bytes,
    folder: Path,
    ext: str,
    *,
    seed: int,
    pattern: str = "[number]-[seed]",
    model_name: str = "",
    prompt: str = "",
    when: datetime | None = None,
    writer: Writer | None = None,
) -> Path:
    """Write an encoded file (an image, a clip) into `folder` under a new name: the naming, atomicity and
    disk-full rules of `save_image`, which calls it."""
    when = when or datetime.now()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f".{ext}", dir=folder)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            (writer or write_durably)(f, data)
        return _claim_name(folder, tmp, pattern, ext, seed, when, model_name, prompt)
    except OSError as exc:
        if exc.errno in _FULL and not isinstance(exc, DiskFull):
            raise DiskFull(
                exc.errno,
                f"disk full while saving a {ext} file into {folder} ({exc.strerror or exc}): it was not saved, "
                "no partial file was left and earlier files are untouched; free some space",
            ) from exc
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _claim_name(
    folder: Path, tmp: Path, pattern: str, ext: str, seed: int, when: datetime, model_name: str, prompt: str
) -> Path:
    if "[number]" not in pattern:
        stem = _file_stem(pattern, None, seed, when, model_name, prompt)
        for i in range(100000):
            target = folder / (f"{stem}.{ext}" if i == 0 else f"{stem}-{i}.{ext}")
            if _publish(tmp, target):
                return target
        raise FileExistsError(f"no free file name for {stem!r} in {folder}")
    number = _next_number(folder)
    while True:
        # a reservation file makes numbers unique between concurrent savers; it lives only while we publish
        reserve = folder / f".{number:05d}.reserve"
        try:
            os.close(os.open(reserve, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            number += 1
            continue
        try:
            if not _number_taken(folder, number):
                target = folder / f"{_file_stem(pattern, number, seed, when, model_name, prompt)}.{ext}"
                if _publish(tmp, target):
                    return target
        finally:
            os.unlink(reserve)
        number += 1


def _decode_user_comment(raw: bytes | str) -> str | None:
    """Text of an EXIF UserComment: 8-byte charset prefix (UNICODE = UTF-16, either byte order; ASCII)."""
    if isinstance(raw, str):
        return raw
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX) :]
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16")
        # no BOM: guess the byte order from where the zero bytes of ASCII characters sit
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        return body.decode("utf-16-be" if even_zeros >= odd_zeros else "utf-16-le", errors="replace")
    if raw.startswith(_ASCII_PREFIX) or raw.startswith(b"\x00" * 8):
        return raw[8:].decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def read_image_info(image: Image.Image) -> tuple[str | None, dict | None, dict[str, str]]:
    """(infotext, manifest, other text chunks) of an image opened with PIL.

    Reads PNG "parameters" (ours and A1111's) and our "ldm_manifest" chunk, a GIF's comment, and for
    JPEG/WebP the EXIF UserComment and MakerNote. The manifest is None when absent or not valid JSON; other
    chunks are the remaining text entries (e.g. ComfyUI's "prompt"/"workflow").
    """
    info = dict(getattr(image, "text", None) or {})
    for key, value in (image.info or {}).items():
        if isinstance(value, str) and key not in info:
            info[key] = value
    infotext = info.pop(PARAMETERS_KEY, None)
    manifest_text = info.pop(MANIFEST_KEY, None)
    try:
        exif = image.getexif().get_ifd(IFD.Exif)
    except Exception:  # a broken EXIF block must not stop PNG Info
        exif = {}
    comment = (image.info or {}).get("comment")  # a GIF's comment extension (our clips hold the infotext there)
    if infotext is None and isinstance(comment, bytes) and comment:
        infotext = comment.decode("utf-8", errors="replace")
    if infotext is None and exif.get(Base.UserComment):
        infotext = _decode_user_comment(exif[Base.UserComment])
    if manifest_text is None and exif.get(Base.MakerNote):
        raw = exif[Base.MakerNote]
        manifest_text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    manifest = None
    if manifest_text is not None:
        try:
            loaded = json.loads(manifest_text)
            manifest = loaded if isinstance(loaded, dict) else None
        except ValueError:
            manifest = None
    others = {k: str(v) for k, v in info.items() if k not in _NOT_TEXT and isinstance(v, str)}
    return (str(infotext) if infotext is not None else None), manifest, others
