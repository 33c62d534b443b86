"""What every script shares: its description (A1111 title, modes, arguments in A1111's `script_args`
order), the context a run gets (engine, job context, grid options) and small helpers to read A1111-style
argument values (booleans as strings, indexes or names for choices).

A script's `prepare(engine, request, args)` checks the arguments up front (a bad value is a RequestError
naming `script_args` before anything is queued) and returns a plan; `run(run, request, plan)` does the work
inside the job queue, generating through `ScriptRun.generate`, which shares the job's cancel token and
reports overall progress across the script's generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest, RequestError
from ..grids import GridOptions
from ..progress import JobContext, Progress

ARGS_FIELD = "script_args"


@dataclass(frozen=True)
class ScriptArg:
    """One control of a script, as A1111's /script-info lists it. `kind`: checkbox, slider, number, text,
    textarea, dropdown, multiselect, radio, checkboxgroup or html (an info text that carries no value; A1111
    still gives it a slot in `script_args`)."""

    label: str | None
    value: Any = None
    kind: str = "text"
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: list[str] | None = None
    visible: bool = True

    def info(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "value": self.value,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "step": self.step,
            "choices": self.choices,
        }


@dataclass(frozen=True)
class Script:
    """A1111 script: `title` (exact A1111 spelling), `modes` it shows in ("txt2img", "img2img"),
    `arguments(engine, mode)` -> its controls in A1111's order, `prepare` and `run` (see the module doc)."""

    title: str
    modes: tuple[str, ...]
    arguments: Callable[[Engine, str], list[ScriptArg]]
    prepare: Callable[[Engine, GenerationRequest, list[Any]], Any]
    run: Callable[[ScriptRun, GenerationRequest, Any], GenerationResult]
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A1111's script name: the title in lower case."""
        return self.title.lower()

    def defaults(self, engine: Engine, mode: str) -> list[Any]:
        return [a.value for a in self.arguments(engine, mode)]


def script_mode(request: GenerationRequest) -> str:
    """The A1111 tab of a request: inpaint runs in img2img."""
    return "txt2img" if request.mode == "txt2img" else "img2img"


class _OverallProgress:
    """A Progress view for one generation of a script: the engine's job_no/job_count are shifted into the
    script's whole run (`offset` jobs done before, `total` in all)."""

    def __init__(self, target: Progress, offset: int, total: int):
        self._target, self._offset, self._total = target, offset, total

    def update(self, **changes: Any) -> None:
        if "job_no" in changes:
            changes["job_no"] = self._offset + int(changes["job_no"])
        if "job_count" in changes:
            changes["job_count"] = max(self._total, self._offset + int(changes["job_count"]))
        if "started_at" in changes and self._offset:
            changes.pop("started_at")  # ETA counts from the script's start
        self._target.update(**changes)

    def snapshot(self):
        return self._target.snapshot()


@dataclass
class ScriptRun:
    """What a script's `run` gets: the engine, the job's context and what to do with grids."""

    engine: Engine
    ctx: JobContext
    grid: GridOptions = field(default_factory=GridOptions)
    total_jobs: int = 1
    jobs_done: int = 0

    @property
    def interrupted(self) -> bool:
        return self.ctx.cancel.interrupted

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """One engine job inside the script's job: same cancel token, progress counted overall."""
        self.ctx.cancel.clear_skip()
        sub = JobContext(
            cancel=self.ctx.cancel, progress=_OverallProgress(self.ctx.progress, self.jobs_done, self.total_jobs)
        )  # type: ignore[arg-type]
        try:
            return self.engine.generate(request, sub)
        finally:
            self.jobs_done += request.n_iter

    def progress_text(self, text: str) -> None:
        self.ctx.progress.update(textinfo=text)

    @property
    def save_singles(self) -> bool:
        return bool(self.engine.config.save_images)


# ---- reading A1111 argument values ----------------------------------------------------------------------
def bad_arg(title: str, index: int, label: str, message: str) -> RequestError:
    return RequestError(ARGS_FIELD, f"{title}: argument {index} ({label}) {message}")


def arg_at(args: Sequence[Any], index: int, default: Any) -> Any:
    """args[index], or `default` when the list is shorter or the value is None."""
    if index < len(args) and args[index] is not None:
        return args[index]
    return default


def as_bool(value: Any, title: str, index: int, label: str) -> bool:
    """A1111 clients send true/false, 0/1 or "true"/"false"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise bad_arg(title, index, label, f"must be true or false; got {value!r}")


def as_number(
    value: Any, title: str, index: int, label: str, lo: float | None = None, hi: float | None = None
) -> float:
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise bad_arg(title, index, label, f"must be a number; got {value!r}") from None
    if (lo is not None and num < lo) or (hi is not None and num > hi):
        raise bad_arg(title, index, label, f"allowed: {lo:g} to {hi:g}; got {value!r}")
    return num


def as_choice(value: Any, choices: Sequence[str], title: str, index: int, label: str) -> str:
    """A choice by index (A1111's type="index" controls) or by name (case-insensitive)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        i = int(value)
        if 0 <= i < len(choices):
            return choices[i]
        raise bad_arg(title, index, label, f"index must be 0..{len(choices) - 1}; got {value!r}")
    text = str(value).strip()
    if text.isdigit() and int(text) < len(choices):
        return choices[int(text)]
    for c in choices:
        if c.lower() == text.lower():
            return c
    raise bad_arg(title, index, label, f"must be one of {list(choices)} (or its index); got {value!r}")


def request_values(request: GenerationRequest) -> dict[str, Any]:
    """The request's field values (images as they are), to build a changed copy with `rebuild`."""
    return {k: getattr(request, k) for k in type(request).model_fields}


def rebuild(request: GenerationRequest, **changes: Any) -> GenerationRequest:
    """A validated copy of `request` with `changes` (RequestError naming the field on a bad value)."""
    values = request_values(request)
    values.update(changes)
    return type(request).build(**values)
