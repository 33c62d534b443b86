"""Stand-ins and helpers for the UI tests.

`FakeEngine` / `FakeService` behave like `ldm_core.engine.Engine` / `ldm_core.service.Service` where the UI
touches them (registries, config, a real `JobQueue`, progress, cancel token, saved PNGs with infotext), but
"generate" paints a flat colour in a few milliseconds per step, so the wiring tests run in well under a
second without torch models. The browser tests use the real `webui.py` instead (see test_browser.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ldm_core.config import EngineConfig
from ldm_core.generation_requests import DEFAULT_SAMPLER, Img2ImgRequest, InpaintRequest, RequestError
from ldm_core.infotext import build_infotext
from ldm_core.jobs import JobQueue
from ldm_core.outputs import output_folder, save_image
from ldm_core.progress import Interrupted, JobContext
from ldm_core.upscalers import UpscalerRegistry
from ldm_core.video.motion_modules import MotionModules


@dataclass(frozen=True)
class FakeEntry:
    name: str
    native_size: int = 64

    @property
    def title(self) -> str:
        return f"{self.name}.safetensors"


@dataclass
class FakeModel:
    entry: FakeEntry
    native_size: int
    tokenizer: Any = None
    rescale_cfg: float = 0.0  # the sidecar's recommendation (Engine: LoadedModel.rescale_cfg)


class FakeRegistry:
    def __init__(self, entries: list[FakeEntry], vaes: list[FakeEntry] | None = None):
        self._entries = entries
        self._vaes = vaes or []
        self.refreshed = 0

    def checkpoints(self) -> list[FakeEntry]:
        return list(self._entries)

    def vaes(self) -> list[FakeEntry]:
        return list(self._vaes)

    def default_checkpoint(self) -> FakeEntry | None:
        return self._entries[0] if self._entries else None

    def find_checkpoint(self, name: str) -> FakeEntry:
        for e in self._entries:
            if name in (e.name, e.title):
                return e
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(e.title for e in self._entries)}")

    def refresh(self) -> None:
        self.refreshed += 1


@dataclass
class FakeSamplerInfo:
    name: str


class FakeSamplers:
    ALIASES = {"DPM++ 2M Karras": ("DPM++ 2M", "Karras"), "k_euler_a": ("Euler a", "Automatic")}

    def names(self) -> list[str]:
        return ["Euler a", "Euler", "DPM++ 2M"]

    def schedule_types(self) -> list[str]:
        return ["Automatic", "Uniform", "Karras"]

    def resolve(self, sampler: str, schedule: str = "Automatic") -> tuple[FakeSamplerInfo, str]:
        if sampler in self.ALIASES:
            name, sched = self.ALIASES[sampler]
            return FakeSamplerInfo(name), sched
        if sampler not in self.names():
            raise RequestError("sampler_name", f"unknown sampler {sampler!r}; choose one of {self.names()}")
        return FakeSamplerInfo(sampler), schedule


@dataclass
class FakeResult:
    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    interrupted: bool = False
    skipped_batches: int = 0


class FakeEngine:
    """Registries and config like Engine; `generate` sleeps `step_seconds` per step and paints a colour
    derived from the seed, honouring interrupt/skip and writing progress and previews."""

    def __init__(self, config: EngineConfig, *, step_seconds: float = 0.002, sizes: dict[str, int] | None = None):
        self.config = config
        sizes = sizes or {"tiny-a": 64, "tiny-b": 128}
        self.models = FakeRegistry([FakeEntry(n, s) for n, s in sizes.items()], [FakeEntry("vae-x")])
        self.samplers = FakeSamplers()
        self.upscalers = UpscalerRegistry([], builtin=None)  # None, Lanczos, Nearest
        self.motion_modules = MotionModules(config.motion_dirs)  # the Video tab's menu
        self.step_seconds = step_seconds
        self.current_model: FakeModel | None = None
        self.requests: list[Any] = []

    def current_model_entry(self) -> FakeEntry | None:
        return self.current_model.entry if self.current_model else self.models.default_checkpoint()

    def refresh_models(self) -> None:
        self.models.refresh()

    def recommended_sampling(self, name: str | None = None) -> tuple[str | None, str | None]:
        # tiny-a stands for a model whose sidecar recommends a sampling (as the built-in one does)
        entry = self.models.find_checkpoint(name) if name else self.current_model_entry()
        return ("DPM++ 2M", "Karras") if entry is not None and entry.name == "tiny-a" else (None, None)

    def load_checkpoint(self, name: str | None = None) -> FakeModel:
        entry = self.models.find_checkpoint(name) if name else self.current_model_entry()
        if entry is None:
            raise RequestError("model", "no model found")
        if self.current_model is None or self.current_model.entry != entry:
            # tiny-a stands for a model whose sidecar recommends CFG rescale 0.7 (as the built-in one does)
            self.current_model = FakeModel(entry, entry.native_size, rescale_cfg=0.7 if entry.name == "tiny-a" else 0.0)
        return self.current_model

    def generate(self, request, ctx: JobContext) -> FakeResult:
        self.requests.append(request)
        model = self.load_checkpoint(request.model)
        info, sched = self.samplers.resolve(request.sampler_name or DEFAULT_SAMPLER, request.scheduler)
        w, h = request.width or model.native_size, request.height or model.native_size
        seed = request.seed if request.seed >= 0 else 1234
        res = FakeResult()
        ctx.progress.update(
            job_no=0, job_count=request.n_iter, step=0, steps=request.steps, started_at=time.monotonic()
        )
        for n in range(request.n_iter):
            ctx.cancel.clear_skip()
            if ctx.cancel.interrupted:
                break
            stopped = None
            for step in range(1, request.steps + 1):
                try:
                    ctx.cancel.check()
                except Interrupted as exc:
                    stopped = exc
                    break
                time.sleep(self.step_seconds)
                ctx.progress.update(
                    job_no=n,
                    step=step,
                    preview=Image.new("RGB", (8, 8), (step * 9 % 255, 0, 0)),
                    preview_step=step,
                )
            for i in range(request.batch_size):
                s = seed + n * request.batch_size + i
                base = request.init_images[0].resize((w, h)) if isinstance(request, Img2ImgRequest) else None
                im = base or Image.new("RGB", (w, h), (s % 256, (s * 7) % 256, (s * 13) % 256))
                params = {
                    "Steps": request.steps,
                    "Sampler": info.name,
                    "Schedule type": sched,
                    "CFG scale": request.cfg_scale,
                    "Seed": s,
                    "Size": f"{w}x{h}",
                    "Model": model.entry.name,
                }
                if isinstance(request, Img2ImgRequest):
                    params["Denoising strength"] = request.denoising_strength
                if isinstance(request, InpaintRequest):
                    params["Mask blur"] = request.mask_blur
                text = build_infotext(request.prompt, request.negative_prompt, params)
                res.images.append(im)
                res.infotexts.append(text)
                res.seeds.append(s)
                res.subseeds.append(-1)
                if request.save_images and self.config.save_images:
                    folder = output_folder(self.config.outputs_dir, request.mode)
                    res.paths.append(
                        save_image(
                            im,
                            folder,
                            infotext=text,
                            manifest=None,
                            seed=s,
                            pattern=self.config.filename_pattern,
                        )
                    )
            if stopped is not None:
                if stopped.skipped:
                    res.skipped_batches += 1
                else:
                    res.interrupted = True
                    break
        return res


class FakeService:
    """The parts of ldm_core.service.Service the UI uses, over a real JobQueue."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.queue = JobQueue(max_queued=8)

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def submit(self, request):
        return self.queue.submit(lambda ctx: self.engine.generate(request, ctx), kind=request.mode, request=request)

    def run_task(self, fn, kind: str = "task"):
        return self.queue.call(fn, kind=kind)

    def switch_model(self, name: str) -> str:
        return self.run_task(lambda ctx: self.engine.load_checkpoint(name)).entry.title

    def interrupt(self) -> bool:
        return self.queue.interrupt_current()

    def skip(self) -> bool:
        return self.queue.skip_current()

    def shutdown(self) -> None:
        self.queue.shutdown()


def fake_context(tmp: Path, **engine_kw):
    """A UiContext over a FakeService whose data dir is `tmp` (settings, styles and outputs inside)."""
    from ldm_core.prompts.styles import StyleStore
    from ui.common import UiContext
    from ui.settings_store import SettingsStore

    cfg = EngineConfig.from_data_dir(tmp, builtin_model_dir=None)
    service = FakeService(FakeEngine(cfg, **engine_kw))
    return UiContext(
        service=service,
        settings=SettingsStore(tmp / "config.json"),
        styles=StyleStore(tmp / "styles.csv"),
        data_dir=tmp,
    )
