"""torch.compile for the engine's hot path: the UNet and the VAE's decoder, compiled once per module and
shape, with the compiles counted and the compiled artifacts cached on disk.

One `Compiler` per engine. `unet(module)` returns the compiled callable of that module (made on first use,
forgotten when the module is freed) or the module itself when compiling is off. Shapes are static
(`dynamic=False`): each resolution, batch and CFG layout compiles once (a "bucket") and is reused. `count` is
the number of graphs compiled so far (a recompile adds one), which tests and benchmarks read.

Weights, two ways:
- as graph inputs (CUDA; `freeze=False`): a change of LoRA weights (merged in place, `prompts.network_state`)
  is read at the next call without a recompile, and the FX-graph cache on disk lets a second start skip
  compiling.
- frozen (CPU; `freeze=True`): inductor folds the weights into the graph as constants and lays them out
  once for the CPU's matmul/convolution kernels (oneDNN prepacking), and the graph runs through inductor's
  C++ wrapper instead of Python: on the built-in model's UNet at 1 thread, 16.4 ms a step against 28.9 eager
  and 25.7 compiled with weights as inputs (`bench/cpu.py --compile`). Frozen weights are copies, so any
  in-place change of a weight (a LoRA merged or restored, anything else) must recompile: `unet()` stamps the
  module's tensors (storage and version counter) and compiles afresh when the stamp changed, dropping the
  stale graphs. On a CPU that costs the compile time again (about a minute for the built-in UNet), once per
  change of LoRA set, and frozen graphs are not kept in the on-disk cache.

When compiling fails (no C++ compiler on a CPU machine, an unsupported op) the module runs eagerly from then
on and the reason is logged once: a job never fails because of the compiler.

Compiled code is cached under `cache_dir` (torch inductor's FX-graph cache; `TORCHINDUCTOR_CACHE_DIR`), so a
second start of the server reaches its first compiled image without compiling again (weights as inputs).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
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

    def __init__(self, enabled: bool, cache_dir: Path | None = None, freeze: bool = False):
        self.enabled = enabled
        self.freeze = freeze
        self.count = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        # module -> (weights stamp or None, compiled callable)
        self._compiled: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int | None, Callable]] = (
            weakref.WeakKeyDictionary()
        )
        self._eager: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        if enabled and cache_dir is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read by inductor when it first caches

    def _new_backend(self) -> Callable:
        """A counting inductor backend; a new one per compile, so that a fresh compile of a module whose
        frozen weights changed misses dynamo's cache entries made with the old one."""

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]):
            from torch._inductor.compile_fx import compile_fx

            with self._lock:
                self.count += 1
            return compile_fx(gm, example_inputs)

        return backend

    def unet(self, module: torch.nn.Module) -> Callable:
        """The callable the loop runs for `module`: compiled when enabled, else the module."""
        if not self.enabled or module in self._eager:
            return module
        stamp = weights_stamp(module) if self.freeze else None
        with self._lock:
            entry = self._compiled.get(module)
            if entry is None or entry[0] != stamp:
                if entry is not None:  # frozen weights changed: drop the graphs that hold the old ones
                    torch._dynamo.reset_code(type(module).forward.__code__)
                entry = (stamp, torch.compile(module, backend=self._new_backend(), dynamic=False))
                self._compiled[module] = entry
        return _Fallback(self, module, entry[1])

    def vae_decode(self, vae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """`z -> vae.decode(z).sample`, with an `AutoencoderKL`'s decoder compiled (as `unet` compiles) when
        compiling is on and the VAE decodes whole; tiled or sliced decoding, and other VAE classes, run
        eagerly (tiles have ragged shapes, each would be a compile)."""
        from diffusers import AutoencoderKL

        whole = not (getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False))
        if not (self.enabled and whole and isinstance(vae, AutoencoderKL)):
            return lambda z: vae.decode(z).sample
        decoder, post = self.unet(vae.decoder), vae.post_quant_conv
        return lambda z: decoder(post(z) if post is not None else z)

    def _call_context(self):
        """Inductor settings read when dynamo traces and inductor compiles (both happen inside the call)."""
        if not self.freeze:
            return nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True, cpp_wrapper=True)

    def give_up(self, module: torch.nn.Module, exc: BaseException) -> None:
        """Run `module` eagerly from now on (compiling it failed)."""
        reason = f"{type(module).__name__}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        log.warning("torch.compile failed, running eagerly (%s)", reason)
        self.failures.append(reason)
        self._eager.add(module)
        self._compiled.pop(module, None)


def weights_stamp(module: torch.nn.Module) -> int:
    """Changes whenever any parameter or buffer of `module` is replaced or changed in place (its storage
    address and autograd version counter; `Tensor.copy_` under no_grad or inference_mode bumps the latter)."""
    return hash(
        tuple(
            (t.data_ptr(), _version(t))
            for m in module.modules()  # one walk over the tree (parameters() and buffers() walk it twice)
            for own in (m._parameters, m._buffers)
            for t in own.values()
            if t is not None
        )
    )


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter
        return -1


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
            with self._compiler._call_context():
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
