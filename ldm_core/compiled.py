"""torch.compile for the engine's hot path: the UNet, compiled once per module and shape, with the compiles
counted and the compiled artifacts cached on disk.

One `Compiler` per engine. `unet(module)` returns the compiled callable of that module (made on first use,
forgotten when the module is freed) or the module itself when compiling is off. Shapes are static
(`dynamic=False`): each resolution, batch and CFG layout compiles once (a "bucket") and is reused; a change of
LoRA weights does not recompile, because the weights are inputs of the compiled graph (merged in place,
read at every call; no constant folding). `count` is the number of graphs compiled so far (a recompile adds
one), which tests and benchmarks read.

When compiling fails (no C++ compiler on a CPU machine, an unsupported op) the module runs eagerly from then
on and the reason is logged once: a job never fails because of the compiler.

Compiled code is cached under `cache_dir` (torch inductor's FX-graph cache; `TORCHINDUCTOR_CACHE_DIR`), so a
second start of the server reaches its first compiled image without compiling again.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def compile_enabled(mode: str, device: torch.device) -> bool:
    """Whether `mode` ("auto", "on", "off") compiles on `device`: "auto" compiles on CUDA only, where it pays
    from the first image; on a CPU the first compile of a UNet takes a minute, so it is asked for ("on")."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {', '.join(MODES)} (got {mode!r})")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class Compiler:
    """Compiled callables of the engine's modules (see the module docstring)."""

    def __init__(self, enabled: bool, cache_dir: Path | None = None):
        self.enabled = enabled
        self.count = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._compiled: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()
        self._eager: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        if enabled and cache_dir is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read by inductor when it first caches

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        from torch._inductor.compile_fx import compile_fx

        with self._lock:
            self.count += 1
        return compile_fx(gm, example_inputs)

    def unet(self, module: torch.nn.Module) -> Callable:
        """The callable the loop runs for `module`: compiled when enabled, else the module."""
        if not self.enabled or module in self._eager:
            return module
        with self._lock:
            compiled = self._compiled.get(module)
            if compiled is None:
                compiled = torch.compile(module, backend=self._backend, dynamic=False)
                self._compiled[module] = compiled
        return _Fallback(self, module, compiled)

    def give_up(self, module: torch.nn.Module, exc: BaseException) -> None:
        """Run `module` eagerly from now on (compiling it failed)."""
        reason = f"{type(module).__name__}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        log.warning("torch.compile failed, running eagerly (%s)", reason)
        self.failures.append(reason)
        self._eager.add(module)
        self._compiled.pop(module, None)


class _Fallback:
    """Calls the compiled module; if compiling it fails, the eager one (and tells the compiler)."""

    def __init__(self, compiler: Compiler, module: torch.nn.Module, compiled: Callable):
        self._compiler, self._module, self._compiled = compiler, module, compiled

    def __getattr__(self, name: str) -> Any:  # config, dtype, parameters(): the module's
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        if self._module in self._compiler._eager:
            return self._module(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:
            if not _is_compiler_error(exc):
                raise
            self._compiler.give_up(self._module, exc)
            return self._module(*args, **kwargs)


def _is_compiler_error(exc: BaseException) -> bool:
    """An error of dynamo/inductor (or the C++ toolchain behind it), not of the model's own computation."""
    import torch._dynamo.exc as dexc

    if isinstance(exc, dexc.BackendCompilerFailed | dexc.Unsupported | dexc.InternalTorchDynamoError):
        return True
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")) or "CppCompileError" in repr(type(exc))
