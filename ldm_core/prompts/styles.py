"""Prompt styles: named prompt/negative-prompt snippets kept in an A1111-compatible `styles.csv`.

The file has the columns `name,prompt,negative_prompt` (any other columns are kept when we rewrite it;
an old `text` column is read as `prompt`). Applying a style: when its text contains "{prompt}", that is
replaced by the user's prompt; otherwise the style is appended after ", " (empty parts are skipped).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm_core.generation_requests import RequestError

log = logging.getLogger(__name__)
PLACEHOLDER = "{prompt}"
COLUMNS = ("name", "prompt", "negative_prompt")
_NEVER_READ = (-1, -1)


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_style_text(style_text: str, prompt: str) -> str:
    """`prompt` with one style text applied: "{prompt}" in the style is replaced by `prompt`, otherwise the
    style is appended after ", " (an empty style leaves the prompt as is; an empty prompt gives the style)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    if not style_text.strip():
        return prompt
    if not prompt.strip():
        return style_text.strip()
    return f"{prompt.strip()}, {style_text.strip()}"


def apply_style_list(prompt: str, negative: str, styles: Iterable[PromptStyle]) -> tuple[str, str]:
    """(prompt, negative) with each style applied in turn, in the order given."""
    for style in styles:
        prompt = merge_style_text(style.prompt, prompt)
        negative = merge_style_text(style.negative_prompt, negative)
    return prompt, negative


class StyleStore:
    """The styles in one csv file. Reads the file again when it changed on disk (users edit it by hand);
    writes are atomic (temp file + rename). Safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = _NEVER_READ
        self._rows: dict[str, dict[str, str]] = {}
        self._fields: list[str] = list(COLUMNS)

    # -- reading
    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        rows: dict[str, dict[str, str]] = {}
        fields = list(COLUMNS)
        if stamp is not None:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                fields += [c for c in reader.fieldnames or [] if c and c not in COLUMNS and c != "text"]
                for raw in reader:
                    row = {k: (v or "") for k, v in raw.items() if isinstance(k, str)}
                    if "prompt" not in row and "text" in row:
                        row["prompt"] = row.pop("text")
                    row.pop("text", None)
                    name = row.get("name", "").strip()
                    if name:
                        rows[name] = row
        self._rows, self._fields, self._stamp = rows, fields, stamp

    def reload(self) -> None:
        """Read the file again now."""
        with self._lock:
            self._stamp = _NEVER_READ
            self._refresh()

    def names(self) -> list[str]:
        """Style names in file order."""
        with self._lock:
            self._refresh()
            return list(self._rows)

    def styles(self) -> list[PromptStyle]:
        """All styles in file order."""
        with self._lock:
            self._refresh()
            return [self._style(r) for r in self._rows.values()]

    @staticmethod
    def _style(row: dict[str, str]) -> PromptStyle:
        return PromptStyle(row.get("name", "").strip(), row.get("prompt", ""), row.get("negative_prompt", ""))

    def get(self, name: str) -> PromptStyle:
        """The style called `name`; RequestError("styles", ...) naming the known styles if there is none."""
        with self._lock:
            self._refresh()
            row = self._rows.get(name.strip())
            if row is None:
                known = list(self._rows)
                if known:
                    msg = f"unknown style {name!r}; choose one of: {', '.join(known)}"
                else:
                    msg = f"unknown style {name!r}; no styles are defined in {self.path}"
                raise RequestError("styles", msg)
            return self._style(row)

    def apply_styles(self, prompt: str, negative: str, names: Iterable[str]) -> tuple[str, str]:
        """(prompt, negative) with the named styles applied in order. A name the file does not define is
        skipped with a log line, as A1111 does: clients send `["None"]`, `[""]` or Swagger's `["string"]`."""
        with self._lock:
            self._refresh()
            rows = self._rows
        styles = []
        for name in names:
            row = rows.get(str(name).strip())
            if row is None:
                log.warning("style %r is not defined in %s; ignored", name, self.path)
            else:
                styles.append(self._style(row))
        return apply_style_list(prompt, negative, styles)

    # -- writing
    def save_style(self, style: PromptStyle) -> None:
        """Add `style`, or replace the style of that name (keeping its place and extra columns)."""
        name = style.name.strip()
        if not name:
            raise RequestError("styles", "a style needs a name")
        with self._lock:
            self._refresh()
            row = dict(self._rows.get(name, {}))
            row.update(name=name, prompt=style.prompt, negative_prompt=style.negative_prompt)
            rows = dict(self._rows)
            rows[name] = row
            self._write(rows)

    def delete_style(self, name: str) -> None:
        """Remove the style called `name` (RequestError if there is none)."""
        self.get(name)
        with self._lock:
            self._refresh()
            rows = {k: v for k, v in self._rows.items() if k != name.strip()}
            self._write(rows)

    def _write(self, rows: dict[str, dict[str, str]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows.values():
            writer.writerow({k: row.get(k, "") for k in self._fields})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._rows = rows
        self._stamp = self._file_stamp()
