"""The Prompts from file or textbox script: one job per line of text; a line is a prompt, or A1111's
command-line form (`--prompt "a cat" --steps 10 --seed 5 ...`) that sets other fields for that line.

`script_args` (A1111's order): checkbox_iterate ("Iterate seed every line"), checkbox_iterate_batch ("Use
same random seed for all lines"), prompt_position ("start"/"end": where the line goes relative to the
request's own prompt), prompt_txt. Older clients send three values without prompt_position (the line then
replaces the prompt).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest, RequestError
from ..grids import GriddedResult
from ..rng import resolve_seed
from .base import ARGS_FIELD, Script, ScriptArg, ScriptRun, arg_at, as_bool, as_choice, rebuild

log = logging.getLogger(__name__)
TITLE = "Prompts from file or textbox"
MAX_LINES = 1000


def _bool(text: str) -> bool:
    return text == "true"


def _styles(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


#: The options a line may set (A1111's list) and how their text is read; None = accepted and ignored.
LINE_OPTIONS: dict[str, Callable[[str], Any] | None] = {
    "sd_model": None,
    "outpath_samples": None,
    "outpath_grids": None,
    "prompt_for_display": None,
    "prompt": str,
    "negative_prompt": str,
    "styles": _styles,
    "seed": int,
    "subseed_strength": float,
    "subseed": int,
    "seed_resize_from_h": int,
    "seed_resize_from_w": int,
    "sampler_index": int,
    "sampler_name": str,
    "batch_size": int,
    "n_iter": int,
    "steps": int,
    "cfg_scale": float,
    "width": int,
    "height": int,
    "restore_faces": None,
    "tiling": _bool,
    "do_not_save_samples": _bool,
    "do_not_save_grid": None,
}


def parse_line(line: str) -> dict[str, Any]:
    """The options of one line: `--key value` pairs (prompt and negative_prompt take every word up to the
    next `--key`). Raises ValueError on an unknown option, a missing or bad value."""
    args = shlex.split(line)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f'must start with "--": {arg}')
        if i + 1 >= len(args):
            raise ValueError(f"missing value for {arg}")
        tag = arg[2:]
        if tag in ("prompt", "negative_prompt"):
            i += 1
            words = [args[i]]
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                words.append(args[i])
                i += 1
            out[tag] = " ".join(words)
            continue
        if tag not in LINE_OPTIONS:
            raise ValueError(f"unknown option {arg}")
        reader = LINE_OPTIONS[tag]
        if reader is not None:
            out[tag] = reader(args[i + 1])
        i += 2
    return out


@dataclass
class FilePlan:
    requests: list[GenerationRequest]
    iterate: bool


def arguments(engine: Engine, mode: str) -> list[ScriptArg]:
    return [
        ScriptArg("Iterate seed every line", False, "checkbox"),
        ScriptArg("Use same random seed for all lines", False, "checkbox"),
        ScriptArg("Insert prompts at the", "start", "radio", choices=["start", "end"]),
        ScriptArg("List of prompt inputs", "", "textarea"),
    ]


def _line_values(engine: Engine, request: GenerationRequest, line: str, position: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {"prompt": line}
    if "--" in line:
        try:
            values = parse_line(line)
        except ValueError as exc:
            log.warning("%s: line %r read as a prompt (%s)", TITLE, line, exc)
    if "do_not_save_samples" in values:
        values["save_images"] = request.save_images and not values.pop("do_not_save_samples")
    if "sampler_index" in values:
        names = list(engine.samplers.names())
        i = values.pop("sampler_index")
        if 0 <= i < len(names):
            values.setdefault("sampler_name", names[i])
    if "styles" in values:
        values["styles"] = [*request.styles, *values["styles"]]
    if position is not None and values.get("prompt") and request.prompt:
        values["prompt"] = (
            f"{values['prompt']} {request.prompt}" if position == "start" else f"{request.prompt} {values['prompt']}"
        )
    return {k: v for k, v in values.items() if k in type(request).model_fields}


def prepare(engine: Engine, request: GenerationRequest, args: list[Any]) -> FilePlan:
    iterate = as_bool(arg_at(args, 0, False), TITLE, 0, "Iterate seed every line")
    same = as_bool(arg_at(args, 1, False), TITLE, 1, "Use same random seed for all lines")
    if len(args) >= 4:
        position: str | None = as_choice(arg_at(args, 2, "start"), ["start", "end"], TITLE, 2, "Insert prompts at the")
        text = arg_at(args, 3, "")
    else:
        position, text = None, arg_at(args, 2, "")
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    if not lines:
        raise RequestError(ARGS_FIELD, f"{TITLE}: the list of prompt inputs is empty")
    if len(lines) > MAX_LINES:
        raise RequestError(ARGS_FIELD, f"{TITLE}: {len(lines)} lines is too many (at most {MAX_LINES})")
    seed = request.seed
    if (iterate or same) and seed == -1:
        seed = resolve_seed(-1)
    requests = []
    for n, line in enumerate(lines):
        values = _line_values(engine, request, line, position)
        values.setdefault("seed", seed)
        try:
            req = rebuild(request, **values)
        except RequestError as exc:
            raise RequestError(ARGS_FIELD, f"{TITLE}: line {n + 1}: {exc.field}: {exc.message}") from None
        requests.append(req)
        if iterate and seed != -1:
            seed += req.batch_size * req.n_iter
    return FilePlan(requests, iterate)


def run(run_: ScriptRun, request: GenerationRequest, plan: FilePlan) -> GenerationResult:
    run_.total_jobs = sum(r.n_iter for r in plan.requests)
    out: GriddedResult | None = None
    prompts: list[str] = []
    negatives: list[str] = []
    for n, req in enumerate(plan.requests):
        if run_.interrupted:
            break
        run_.progress_text(f"{TITLE}: line {n + 1} out of {len(plan.requests)}")
        res = run_.generate(req)
        if out is None:
            out = GriddedResult.from_result(res, images=[], infotexts=[], seeds=[], subseeds=[], manifests=[], paths=[])
        out.images += res.images
        out.infotexts += res.infotexts
        out.seeds += res.seeds
        out.subseeds += res.subseeds
        out.manifests += res.manifests
        out.paths += res.paths
        prompts += [req.prompt] * len(res.images)
        negatives += [req.negative_prompt] * len(res.images)
        out.skipped_batches += res.skipped_batches
        if res.interrupted:
            break
    if out is None:
        return GriddedResult(interrupted=True)
    if len(out.paths) != len(out.images):
        out.paths = []
    out.interrupted = run_.interrupted
    out.all_prompts, out.all_negative_prompts = prompts, negatives
    return out


SCRIPT = Script(TITLE, ("txt2img", "img2img"), arguments, prepare, run)
