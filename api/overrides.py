"""`override_settings` of A1111 txt2img/img2img requests, as A1111 honours them.

`plan_overrides` checks a request's override_settings against the options store (a bad value is a 422 naming
`override_settings.<key>`), looks up the checkpoint and VAE (one this server does not have falls back to the
current one with a warning, as A1111 does, instead of failing the request) and lists the settings it cannot
apply to a single job (unknown keys, options this server only stores, server-wide options) as warnings for
the response's `info`.

`overrides_applied` wraps the job's submission so that the override lasts for that job only: when it names a
checkpoint, a task queued just before the job remembers the current model and one queued just after it loads
that model back, so the next request runs on the model it would have run on anyway. With
`override_settings_restore_afterwards: false` nothing is restored and the settings are saved to the options
store, as a POST /sdapi/v1/options would (A1111 keeps them too).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm_core.jobs import QueueFull
from ldm_core.options import (
    AUTOMATIC_VAES,
    OPTIONS_BY_KEY,
    checked_overrides,
    effective_applies,
    request_fields,
)

from .common import ApiContext

log = logging.getLogger(__name__)
OVERRIDE = "override_settings"


@dataclass
class OverridePlan:
    """A request's override_settings made ready for one job: `settings` (validated, fallbacks applied),
    `warnings` for `info`, and whether to `restore` afterwards."""

    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    restore: bool = True


def _warn(plan: OverridePlan, text: str) -> None:
    log.warning("%s", text)
    plan.warnings.append(text)


def plan_overrides(ctx: ApiContext, raw: Mapping[str, Any] | None, restore: bool = True) -> OverridePlan:
    """Validate `raw` (a request's override_settings) against the options and the model registry."""
    plan = OverridePlan(settings=checked_overrides(raw), restore=bool(restore))
    engine = ctx.engine
    name = plan.settings.get("sd_model_checkpoint")
    if not name:
        plan.settings.pop("sd_model_checkpoint", None)  # empty: the current model
    else:
        try:
            plan.settings["sd_model_checkpoint"] = engine.models.find_checkpoint(str(name)).title
        except (KeyError, LookupError, ValueError):
            plan.settings.pop("sd_model_checkpoint")
            current = engine.current_model_entry()
            _warn(
                plan,
                f"{OVERRIDE}.sd_model_checkpoint: checkpoint {name!r} not found; using the current model "
                f"{current.title if current is not None else None!r}",
            )
    vae = plan.settings.get("sd_vae")
    if vae is not None and vae not in AUTOMATIC_VAES:
        try:
            engine.models.find_vae(str(vae))
        except (KeyError, LookupError, ValueError):
            plan.settings["sd_vae"] = "Automatic"
            _warn(plan, f"{OVERRIDE}.sd_vae: VAE {vae!r} not found; using the checkpoint's own VAE")
    if not plan.restore:
        return plan  # saved before the job runs: server-wide options apply to it as well
    saved, fields = ctx.options, request_fields()
    for key, value in plan.settings.items():
        option = OPTIONS_BY_KEY.get(key)
        if option is None:
            if saved.get(key, object()) != value:
                _warn(plan, f"{OVERRIDE}.{key}: unknown setting; ignored")
            continue
        used = option.field is not None and option.field in fields and effective_applies(option) != "stored"
        if option.maps in ("save", "grid") or used:
            continue  # applied to this job (its request, or its batch grid)
        if saved.get(key) == value:
            continue  # what the server does anyway (clients often echo GET /options)
        if effective_applies(option) == "stored":
            _warn(plan, f"{OVERRIDE}.{key}: not used by this server; ignored")
        else:
            _warn(
                plan,
                f"{OVERRIDE}.{key}: a server-wide setting, not applied to one job; set it with POST "
                "/sdapi/v1/options or override_settings_restore_afterwards: false",
            )
    return plan


@contextlib.contextmanager
def overrides_applied(ctx: ApiContext, plan: OverridePlan) -> Iterator[None]:
    """Wrap the submission of the job that `plan` belongs to (exactly one job, submitted inside the block).

    With a checkpoint override to restore, a task queued before the job remembers the current model and one
    queued after it loads that model back (the queue runs them in order, so no other request sees the
    override). With `restore` false the settings are saved to the options store once the job is queued."""
    if not plan.restore:
        yield
        if plan.settings:
            ctx.options.update(plan.settings, allow_unknown=True)
        return
    if "sd_model_checkpoint" not in plan.settings:
        yield
        return
    engine, queue = ctx.engine, ctx.service.queue
    before: dict[str, str | None] = {}

    def remember(_job_ctx) -> None:
        model = engine.current_model
        before["title"] = model.entry.title if model is not None else None

    def restore(_job_ctx) -> None:
        title = before.get("title") or _plain_model_title(ctx)
        current = engine.current_model
        if title is not None and (current is None or current.entry.title != title):
            engine.load_checkpoint(title)
            log.info("override_settings: restored the model %s", title)

    with ctx.queue_lock:  # the three queue entries stay together
        queue.submit(remember, kind="task")
        yield
        try:
            queue.submit(restore, kind="load-model")
        except QueueFull:  # the job is queued already: answer it; the model stays until the next switch
            log.error("override_settings: the queue is full; the model of this request stays loaded")


def _plain_model_title(ctx: ApiContext) -> str | None:
    """The model a request without an override loads when none is loaded: the saved one, else the default."""
    engine = ctx.engine
    saved = ctx.options.get("sd_model_checkpoint") or ""
    if saved:
        try:
            return engine.models.find_checkpoint(saved).title
        except (KeyError, LookupError, ValueError):
            pass
    entry = engine.models.default_checkpoint()
    return entry.title if entry is not None else None
