"""Batch mode: many generation requests from a JSONL or CSV file, fanned out over a service, resumable.

Each JSONL line is one request in the A1111 API's txt2img shape (`{"prompt": ..., "steps": 20, "seed": -1,
"sampler_name": "Euler a", ...}`), read as liberally as the API reads it: unknown keys are ignored, `null`
means the default, `sampler_index` stands for `sampler_name`, and `override_settings` set every generation
option the API honours there (`sd_model_checkpoint`, `sd_vae`, `CLIP_stop_at_last_layers`, `eta_noise_seed_delta`,
...: `ldm_core.options` maps them, as for the API). A CSV file has a header row of the
same field names (a `prompt` column at least); an empty cell means the default and a cell holding JSON (`[...]`,
`{...}`) is decoded for list and dict fields such as `styles`.

Random seeds (-1) are drawn before the job is queued, so the request recorded in the manifest is the one that
ran and rerunning it gives the same pixels. Images are written by this module (not the worker, which may be on
another machine) as `<out>/<line>-<n>.png` with their infotext and manifest chunks, each atomically.

The manifest `<out>/manifest.jsonl` gets one JSON object per finished item (appended, flushed and fsynced):
`line`, `input_sha` (of the input line), `status` ("done", "failed" or "invalid"), `request` (the fields that
differ from the defaults, resolved seeds included), `seeds`, `subseeds`, `files` (relative to `<out>`),
`worker`, `seconds`, `error`. The last record of a line wins. On a rerun an item whose line has a "done"
record with the same `input_sha` and all its files present is skipped; anything else is (re)done.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generation_requests import GenerationRequest, RequestError
from .options import checked_overrides, request_values
from .outputs import encode_png_bytes
from .rng import resolve_seed

MANIFEST_NAME = "manifest.jsonl"
# fields that hold images or run modes this batch mode does not take
_NOT_TAKEN = {"mode", "init_images", "mask"}


@dataclass
class BatchItem:
    """One input line: its 1-based `line` number in the file, the raw `values`, the `request` built from them
    (None when `error` says why the line is bad) and `input_sha`, the line's identity for resuming."""

    line: int
    values: dict[str, Any]
    input_sha: str
    request: GenerationRequest | None = None
    error: str | None = None
    ignored: list[str] = field(default_factory=list)


@dataclass
class BatchReport:
    """What a batch run did. `failed` and `invalid` hold (line, message) pairs."""

    total: int = 0
    skipped: int = 0
    submitted: int = 0
    done: int = 0
    images: int = 0
    seconds: float = 0.0
    failed: list[tuple[int, str]] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# ---- reading the input ------------------------------------------------------------------------------------
def _sha(values: dict[str, Any]) -> str:
    text = json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _csv_cell(name: str, cell: str) -> Any:
    text = cell.strip()
    if text[:1] in "[{":
        info = GenerationRequest.model_fields.get(name)
        if info is not None and info.annotation is not str:
            try:
                return json.loads(text)
            except ValueError:
                pass
    return cell


def read_items(path: Path, *, fmt: str | None = None) -> Iterator[BatchItem]:
    """The requests of a JSONL (default) or CSV (`.csv`, or `fmt="csv"`) file, one BatchItem per non-empty
    line. Bad lines come back with `error` set (naming the line's problem); the reader goes on."""
    path = Path(path)
    fmt = (fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")).lower()
    if fmt == "csv":
        yield from _read_csv(path)
    elif fmt in ("jsonl", "json", "ndjson"):
        yield from _read_jsonl(path)
    else:
        raise ValueError(f"input format {fmt!r} is not supported; choose jsonl or csv")


def _read_jsonl(path: Path) -> Iterator[BatchItem]:
    with open(path, encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            try:
                values = json.loads(text)
            except ValueError as exc:
                yield BatchItem(number, {}, _sha({"raw": text}), error=f"not valid JSON: {exc}")
                continue
            if not isinstance(values, dict):
                kind = type(values).__name__
                yield BatchItem(number, {}, _sha({"raw": text}), error=f"expected a JSON object, got {kind}")
                continue
            yield make_item(number, values)


def _read_csv(path: Path) -> Iterator[BatchItem]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
                if "prompt" not in header:
                    raise ValueError(f"{path}: the CSV header row needs a 'prompt' column; got {header}")
                continue
            number = reader.line_num
            if len(row) > len(header):
                yield BatchItem(
                    number, {}, _sha({"raw": row}), error=f"{len(row)} cells but the header has {len(header)}"
                )
                continue
            values = {name: _csv_cell(name, cell) for name, cell in zip(header, row, strict=False) if cell.strip()}
            yield make_item(number, values)


def make_item(line: int, values: dict[str, Any]) -> BatchItem:
    """A BatchItem for input `values` (one A1111-shaped request) found at `line`."""
    item = BatchItem(line, values, _sha(values))
    try:
        item.request, item.ignored = request_from_values(values)
    except RequestError as exc:
        item.error = str(exc)
    return item


def request_from_values(values: dict[str, Any]) -> tuple[GenerationRequest, list[str]]:
    """A txt2img GenerationRequest from A1111 API-shaped `values`, and the names of the keys it ignored.
    Raises RequestError naming the field when a value is bad."""
    fields = GenerationRequest.model_fields
    kept: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in values.items():
        if key in _NOT_TAKEN:
            if key == "mode" and value in (None, "txt2img"):
                continue
            raise RequestError(key, "batch mode runs txt2img requests; init images, masks and modes are not taken")
        if key not in fields:
            if key not in ("sampler_index", "override_settings"):
                ignored.append(key)
            continue
        if value is not None:
            kept[key] = value
    if "sampler_name" not in kept and values.get("sampler_index"):
        kept["sampler_name"] = values["sampler_index"]
    if kept.get("s_tmax") in (0, "0", 0.0):  # A1111: 0 means infinity
        kept.pop("s_tmax")
    overrides = values.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings", "must be an object of setting names and values")
    # every generation option the API's override_settings honour, mapped by the one options table
    extra, skipped = request_values({}, checked_overrides(overrides), set(kept), kept.get("sampler_name"))
    kept.update(extra)
    ignored += [f"override_settings.{key}" for key in skipped]
    request = GenerationRequest.build(**kept)
    return request, ignored


def resolve_seeds(request: GenerationRequest) -> GenerationRequest:
    """`request` with its random seed (-1) and, when variation is on, its random subseed drawn now."""
    update: dict[str, int] = {}
    if request.seed < 0:
        update["seed"] = resolve_seed(request.seed)
    if request.subseed_strength > 0 and request.subseed < 0:
        update["subseed"] = resolve_seed(request.subseed)
    return request.model_copy(update=update) if update else request


def image_count(request: GenerationRequest) -> int:
    return request.batch_size * request.n_iter


# ---- the manifest -----------------------------------------------------------------------------------------
def request_record(request: GenerationRequest) -> dict[str, Any]:
    """The request as JSON: the fields that differ from the defaults, plus prompt and seed always."""
    data = request.model_dump(exclude_defaults=True, exclude={"init_images", "mask", "save_images"})
    data.setdefault("prompt", request.prompt)
    data["seed"] = request.seed
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


class Manifest:
    """The append-only JSONL manifest of a batch output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_NAME

    def records(self) -> dict[int, dict[str, Any]]:
        """The last record of each line (a torn last line, from a crash mid-write, is ignored)."""
        out: dict[int, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with open(self.path, encoding="utf-8") as f:
            for text in f:
                try:
                    rec = json.loads(text)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("line"), int):
                    out[rec["line"]] = rec
        return out

    def is_done(self, item: BatchItem, records: dict[int, dict[str, Any]]) -> bool:
        rec = records.get(item.line)
        return (
            rec is not None
            and rec.get("status") == "done"
            and rec.get("input_sha") == item.input_sha
            and all((self.out_dir / name).is_file() for name in rec.get("files", []))
        )

    def append(self, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:  # one write of a whole line: a crash leaves at most a torn last line
            if f.tell() > 0 and not _ends_with_newline(self.path):
                f.write(b"\n")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder: readers see the old file or the new."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_result(out_dir: Path, line: int, result: Any) -> list[str]:
    """Write a job's images as `<line>-<n>.png` (infotext and manifest embedded); their names."""
    names = []
    for n, image in enumerate(result.images):
        infotext = result.infotexts[n] if n < len(result.infotexts) else ""
        manifest = result.manifests[n] if n < len(result.manifests) else None
        name = f"{line:05d}-{n}.png"
        write_atomic(out_dir / name, encode_png_bytes(image, infotext, manifest))
        names.append(name)
    return names


# ---- running ----------------------------------------------------------------------------------------------
def _worker_of(job: Any) -> str | None:
    """The engine that ran `job` (a Ray replica's host:pid), None in-process."""
    return job.progress().worker or None


def _seconds(job: Any, submitted_at: float) -> float:
    started, finished = getattr(job, "started_at", None), getattr(job, "finished_at", None)
    if isinstance(started, float) and isinstance(finished, float) and finished >= started:
        return round(finished - started, 4)
    return round(time.time() - submitted_at, 4)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_batch(
    service: Any,
    items: Iterable[BatchItem],
    out_dir: Path,
    *,
    window: int = 4,
    limit: int | None = None,
    default_model: str | None = None,
    progress: bool = True,
    expected_images: int | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchReport:
    """Run `items` on `service` (anything with `submit(request) -> Job`), keeping up to `window` jobs queued,
    writing images and the manifest into `out_dir`. Items already done (see the module docstring) are
    skipped; `limit` caps how many input items are looked at. Bad items and failed jobs are recorded and
    reported; the others go on. `expected_images` (see `count_images`) sizes the progress bar up front."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    records = manifest.records()
    report = BatchReport()
    window = max(1, window)
    bar = tqdm(
        total=expected_images or 0, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True, smoothing=0.1
    )
    say = log or (lambda text: tqdm.write(text, file=sys.stderr))
    pending: list[tuple[BatchItem, GenerationRequest, Any, float]] = []
    ignored_once: set[str] = set()
    start = time.perf_counter()

    def collect(block: bool) -> None:
        while pending:
            finished = [p for p in pending if p[2].finished]
            if finished or not block:
                break
            pending[0][2].wait(0.05)
        for entry in [p for p in pending if p[2].finished]:
            pending.remove(entry)
            _finish(entry)

    def _finish(entry: tuple[BatchItem, GenerationRequest, Any, float]) -> None:
        item, request, job, submitted_at = entry
        record: dict[str, Any] = {
            "line": item.line,
            "input_sha": item.input_sha,
            "request": request_record(request),
            "worker": _worker_of(job),
            "seconds": _seconds(job, submitted_at),
        }
        error = job.error
        if error is None and (job.result is None or not job.result.images):
            error = RuntimeError(f"the job ended {getattr(job, 'state', 'without a result')} with no images")
        if error is None:
            try:
                record["files"] = save_result(out_dir, item.line, job.result)
            except OSError as exc:
                error = exc
        if error is not None:
            message = _error_text(error)
            record.update(status="failed", error=message)
            report.failed.append((item.line, message))
            say(f"line {item.line}: failed: {message}")
            bar.total -= image_count(request)
        else:
            record.update(status="done", seeds=list(job.result.seeds), subseeds=list(job.result.subseeds))
            report.done += 1
            report.images += len(record["files"])
            bar.update(len(record["files"]))
        manifest.append(record)
        bar.refresh()

    try:
        for index, item in enumerate(items):
            if limit is not None and index >= limit:
                break
            report.total += 1
            if item.error is not None or item.request is None:
                message = item.error or "no request"
                report.invalid.append((item.line, message))
                say(f"line {item.line}: {message}")
                manifest.append({"line": item.line, "input_sha": item.input_sha, "status": "invalid", "error": message})
                continue
            new = [k for k in item.ignored if k not in ignored_once]
            if new:
                ignored_once.update(new)
                say(f"line {item.line}: ignoring unknown key(s) {', '.join(new)} (as the API does)")
            if manifest.is_done(item, records):
                report.skipped += 1
                continue
            request = item.request
            if default_model and request.model is None:
                request = request.model_copy(update={"model": default_model})
            request = resolve_seeds(request.model_copy(update={"save_images": False}))
            while len(pending) >= window:
                collect(block=True)
            if expected_images is None:
                bar.total += image_count(request)
                bar.refresh()
            try:
                job = _submit(service, request, lambda: collect(block=True))
            except ValueError as exc:  # a request the service refuses before queueing it (RequestError)
                message = _error_text(exc)
                report.failed.append((item.line, message))
                say(f"line {item.line}: failed: {message}")
                if expected_images is not None:
                    bar.total -= image_count(request)
                manifest.append(
                    {"line": item.line, "input_sha": item.input_sha, "request": request_record(request),
                     "status": "failed", "error": message}
                )  # fmt: skip
                continue
            report.submitted += 1
            pending.append((item, request, job, time.time()))
            collect(block=False)
        while pending:
            collect(block=True)
    finally:
        report.seconds = time.perf_counter() - start
        bar.close()
    return report


def count_images(items: Iterable[BatchItem], out_dir: Path, *, limit: int | None = None) -> int:
    """How many images a `run_batch` over `items` into `out_dir` will make (done items left out): a first pass
    over the input, so the progress bar knows its total without holding every request in memory."""
    manifest = Manifest(out_dir)
    records = manifest.records()
    total = 0
    for index, item in enumerate(items):
        if limit is not None and index >= limit:
            break
        if item.request is not None and not manifest.is_done(item, records):
            total += image_count(item.request)
    return total


def _submit(service: Any, request: GenerationRequest, wait_some: Callable[[], None]) -> Any:
    """`service.submit(request)`, waiting for room while the service's queue is full."""
    while True:
        try:
            return service.submit(request)
        except RuntimeError as exc:
            if type(exc).__name__ != "QueueFull":  # ldm_core.jobs.QueueFull, or the pool's own
                raise
            wait_some()
            time.sleep(0.05)


def summary(report: BatchReport) -> str:
    """A few lines for the end of a run: counts, throughput and every failed or bad line."""
    lines = [
        f"{report.done} item(s) done ({report.images} image(s) in {report.seconds:.1f} s, "
        f"{report.images_per_second:.2f} images/s), {report.skipped} skipped as already done, "
        f"{len(report.failed)} failed, {len(report.invalid)} bad line(s)"
    ]
    for line, message in report.invalid:
        lines.append(f"  bad line {line}: {message}")
    for line, message in report.failed:
        lines.append(f"  failed line {line}: {message}")
    return "\n".join(lines)
