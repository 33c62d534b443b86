"""The A1111 "parameters" text (infotext): build it from generation parameters and parse it back.

Layout (the same text other UIs and model-sharing sites read)::

    <positive prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>        (omitted when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ..., Version: v1.0

The last line is `Key: value` pairs joined by ", ". A value holding ",", ":", a newline, a leading `"` or
leading/trailing whitespace is written as a JSON string, so that the readers' regex (`PARAM_RE`) reads every
value back unchanged. `build_infotext -> parse_infotext -> build_infotext` is exact.
"""

from __future__ import annotations

import json
import re

#: Order of the keys we (and A1111) write. Keys not listed (extensions) follow in insertion order, before
#: "Version", which is always last.
INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    # mode and feature extras
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
    "Eta DDIM",
    "Eta",
    "Sigma churn",
    "Sigma tmin",
    "Sigma tmax",
    "Sigma noise",
    "Hires prompt",
    "Hires negative prompt",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires checkpoint",
    "Hires upscaler",
    "Hires sampler",
    "Hires schedule type",
    "Hires CFG Scale",
    "Refiner",
    "Refiner switch at",
    "Mask blur",
    "Mask blur x",
    "Mask blur y",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    "Mask mode",
    "Noise multiplier",
    "Lora hashes",
    "TI hashes",
    "Emphasis",
    # what this server did otherwise than asked to finish the job: the lighter steps taken after an
    # out-of-memory error (ldm_core.memory), e.g. "Memory fallback: vae tiling, attention slicing"
    "Memory fallback",
    "Version",
)

#: The regex other readers use for the parameters line: group 1 is the key, group 2 the (maybe quoted) value.
PARAM_RE = re.compile(r"""\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)""")
_KEY_RE = re.compile(r"\w[\w \-/]+")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_KNOWN = frozenset(INFOTEXT_KEY_ORDER)
_RANK = {k: i for i, k in enumerate(INFOTEXT_KEY_ORDER)}


def format_value(value: object) -> str:
    """A parameter value as infotext text (not yet quoted): floats without a needless ".0" (7.0 -> "7"),
    a (w, h) pair as "WxH", booleans as "True"/"False", anything else through str()."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)


def infotext_number(v: float) -> int | float:
    """A number as A1111 writes it in infotext: 7.0 -> 7, others rounded to 4 decimals."""
    return int(v) if float(v).is_integer() else round(float(v), 4)


def quote(text: str) -> str:
    """`text` as it goes after "Key: ": JSON-quoted when it would otherwise not read back unchanged."""
    if any(c in text for c in ",:\n\r") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """The inverse of `quote`; text that is not a valid JSON string is returned as is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


def _merge_split_pairs(params: dict[str, object]) -> dict[str, object]:
    """Fold "K-1"/"K-2" pairs (as `parse_infotext` returns for WxH values) back into "K" when "K" is
    absent; drop them when "K" is present."""
    out: dict[str, object] = {}
    for key, value in params.items():
        base, _, suffix = key.rpartition("-")
        if suffix in ("1", "2") and base and f"{base}-1" in params and f"{base}-2" in params:
            if base in params:
                continue
            if suffix == "1":
                out[base] = f"{format_value(params[key])}x{format_value(params[base + '-2'])}"
            continue
        out[key] = value
    return out


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The infotext for one image.

    `params` maps A1111 key names ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", ...) to
    values (str, int, float, bool, or a (w, h) pair for "Size"-like keys). None and empty values are left
    out; "Clip skip" only appears when > 1. Known keys follow `INFOTEXT_KEY_ORDER`; other keys (extensions)
    keep their insertion order and come before "Version". Raises ValueError for a key the readers' regex
    cannot read (it must match `\\w[\\w \\-/]+`).
    """
    entries: list[tuple[str, str]] = []
    for key, value in _merge_split_pairs(params).items():
        if value is None:
            continue
        text = format_value(value)
        if text == "":
            continue
        if key == "Clip skip" and text.isdigit() and int(text) <= 1:
            continue
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"infotext key {key!r} must be letters, digits, spaces, '-', '/' (2+ chars)")
        entries.append((key, text))
    unknown_rank = _RANK["Version"] - 0.5  # extensions: after every known key but Version
    entries.sort(key=lambda kv: _RANK.get(kv[0], unknown_rank))  # stable: insertion order within a rank
    lines = []
    if prompt:
        lines.append(prompt)
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    if entries:
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in entries))
    return "\n".join(lines)


def _params_line(line: str) -> list[tuple[str, str]] | None:
    """The (key, raw value) pairs of `line` if it is a parameters line, else None.

    A parameters line starts with a pair and either has at least 3 pairs (A1111's rule) or is read
    completely by `PARAM_RE` and names at least one key we write ourselves.
    """
    if line.startswith(_NEGATIVE):
        return None
    matches = [m for m in PARAM_RE.finditer(line) if m.group(0)]
    if not matches or matches[0].start() != 0:
        return None
    pairs = [(m.group(1), m.group(2)) for m in matches]
    if len(pairs) >= 3:
        return pairs
    covered = all(a.end() == b.start() for a, b in zip(matches, matches[1:], strict=False))
    if covered and matches[-1].end() == len(line) and any(k in _KNOWN for k, _ in pairs):
        return pairs
    return None


def parse_infotext(text: str) -> dict[str, object]:
    """Read an infotext (ours or A1111's) into {"Prompt", "Negative prompt", each key: value}.

    Values are the strings that were written, JSON-unquoted. A value of the form "WxH" is also given as
    "<key>-1" (W) and "<key>-2" (H), the way A1111's png-info API reports "Size-1"/"Size-2". Text without a
    parameters line is all prompt. A prompt line that itself starts with "Negative prompt:" cannot be told
    apart from the negative prompt.
    """
    lines = text.split("\n")
    params: list[tuple[str, str]] = []
    last = len(lines) - 1
    while last > 0 and not lines[last].strip():
        last -= 1
    found = _params_line(lines[last].rstrip("\r")) if lines else None
    if found is not None:
        params = found
        lines = lines[:last]
    neg_at = next((i for i, line in enumerate(lines) if line.startswith(_NEGATIVE)), None)
    if neg_at is None:
        prompt, negative = "\n".join(lines), ""
    else:
        prompt = "\n".join(lines[:neg_at])
        negative = "\n".join(lines[neg_at:])[len(_NEGATIVE) :]
        if negative.startswith(" "):
            negative = negative[1:]
    result: dict[str, object] = {"Prompt": prompt, "Negative prompt": negative}
    for key, raw in params:
        value = unquote(raw.strip()) if raw.startswith('"') else raw.strip()
        result[key] = value
        size = _SIZE_RE.match(value)
        if size:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
    return result
