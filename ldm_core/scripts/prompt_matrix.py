"""The Prompt matrix script: a prompt "base | a | b" makes every combination of the optional parts
(base; base, a; base, b; base, a, b), one image each, and a grid labelled with the parts.

`script_args` (A1111's order): put_at_start, different_seeds, prompt_type ("positive"/"negative"),
variations_delimiter ("comma"/"space"), margin_size. Older clients send only the first two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest
from ..grids import GriddedResult, annotated_grid, image_grid, save_grid
from ..rng import resolve_seed
from .base import Script, ScriptArg, ScriptRun, arg_at, as_bool, as_choice, as_number, bad_arg, rebuild

TITLE = "Prompt matrix"
MAX_PARTS = 9  # 2**8 = 256 images


@dataclass
class MatrixPlan:
    parts: list[str]
    prompts: list[str]  # one per image, in combination order
    requests: list[GenerationRequest]
    margin: int


def combinations(text: str, put_at_start: bool = False, delimiter: str = ", ") -> tuple[list[str], list[str]]:
    """(parts, prompts): the "|"-separated parts of `text` and one prompt per combination; combination i
    keeps optional part k when bit k of i is set. The base part goes first (or last with put_at_start)."""
    parts = text.split("|")
    out = []
    for i in range(2 ** (len(parts) - 1)):
        chosen = [p.strip().strip(",") for k, p in enumerate(parts[1:]) if i & (1 << k)]
        ordered = [*chosen, parts[0]] if put_at_start else [parts[0], *chosen]
        out.append(delimiter.join(ordered))
    return parts, out


def arguments(engine: Engine, mode: str) -> list[ScriptArg]:
    return [
        ScriptArg("Set at prompt start", False, "checkbox"),
        ScriptArg("Random seeds", False, "checkbox"),
        ScriptArg("Prompt type", "positive", "radio", choices=["positive", "negative"]),
        ScriptArg("Joining char", "comma", "radio", choices=["comma", "space"]),
        ScriptArg("Grid margins (px)", 0, "slider", 0, 500, 2),
    ]


def prepare(engine: Engine, request: GenerationRequest, args: list[Any]) -> MatrixPlan:
    at_start = as_bool(arg_at(args, 0, False), TITLE, 0, "Set at prompt start")
    different = as_bool(arg_at(args, 1, False), TITLE, 1, "Random seeds")
    kind = as_choice(arg_at(args, 2, "positive"), ["positive", "negative"], TITLE, 2, "Prompt type")
    joining = as_choice(arg_at(args, 3, "comma"), ["comma", "space"], TITLE, 3, "Joining char")
    margin = int(as_number(arg_at(args, 4, 0), TITLE, 4, "Grid margins (px)", 0, 500))
    source = request.prompt if kind == "positive" else request.negative_prompt
    if source.count("|") >= MAX_PARTS:
        raise bad_arg(TITLE, 2, "Prompt type", f"the prompt has more than {MAX_PARTS} '|' parts")
    parts, prompts = combinations(source, at_start, ", " if joining == "comma" else " ")
    seed = resolve_seed(request.seed)
    key = "prompt" if kind == "positive" else "negative_prompt"
    requests = [
        rebuild(request, **{key: p}, seed=seed + (i if different else 0), batch_size=1, n_iter=1)
        for i, p in enumerate(prompts)
    ]
    return MatrixPlan(parts, prompts, requests, margin)


def _labels(parts: list[str], bits: range, index: int) -> str:
    on = [parts[1 + b].strip() for b in bits if index & (1 << (b - bits.start))]
    return "\n".join(on) if on else "-"


def run(run_: ScriptRun, request: GenerationRequest, plan: MatrixPlan) -> GenerationResult:
    run_.total_jobs = len(plan.requests)
    results = []
    for n, req in enumerate(plan.requests):
        if run_.interrupted:
            break
        run_.progress_text(f"{TITLE}: {n + 1} out of {len(plan.requests)}")
        res = run_.generate(req)
        if not res.images:
            break
        results.append((req, res))
    if not results:
        return GriddedResult(interrupted=True)
    images = [r.images[0] for _, r in results]
    optional = len(plan.parts) - 1
    row_bits = optional // 2
    rows = 1 << row_bits
    col_bits = optional - row_bits
    cols = 1 << col_bits
    first = results[0][1]
    text = first.infotexts[0] if first.infotexts else ""
    out = [*images]
    grid_count = 0
    if len(images) == len(plan.requests) and len(images) > 1:
        w, h = images[0].size
        grid = image_grid(images, rows=rows, margin=plan.margin)
        col_labels = [_labels(plan.parts, range(0, col_bits), c) for c in range(cols)]
        row_labels = [_labels(plan.parts, range(col_bits, optional), r) for r in range(rows)]
        grid = annotated_grid(grid, w, h, col_labels, row_labels, plan.margin)
        out.insert(0, grid)
        grid_count = 1
    paths = []
    if grid_count and run_.grid.save:
        paths.append(
            save_grid(
                out[0],
                run_.engine.config.outputs_dir,
                request.mode,
                infotext=text,
                manifest=first.manifests[0] if first.manifests else None,
                seed=first.seeds[0] if first.seeds else -1,
                prompt=request.prompt,
                model_name=first.model_name,
            )
        )
    singles = [r for _, r in results]
    saved = [r.paths[0] for r in singles if r.paths]
    return GriddedResult.from_result(
        first,
        images=out,
        infotexts=[text] * grid_count + [r.infotexts[0] if r.infotexts else "" for r in singles],
        seeds=[first.seeds[0]] * grid_count + [r.seeds[0] for r in singles],
        subseeds=[first.subseeds[0]] * grid_count + [r.subseeds[0] for r in singles],
        manifests=[first.manifests[0]] * grid_count + [r.manifests[0] for r in singles],
        paths=paths + saved if len(saved) == len(singles) and (paths or not grid_count) else [],
        interrupted=run_.interrupted or len(results) < len(plan.requests),
        index_of_first_image=grid_count,
        all_prompts=[q.prompt for q, _ in results],
        all_negative_prompts=[q.negative_prompt for q, _ in results],
    )


SCRIPT = Script(TITLE, ("txt2img", "img2img"), arguments, prepare, run)
