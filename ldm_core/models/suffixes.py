"""Weight-file suffixes: the one definition of which file extensions hold model weights, and which of them
each model folder lists (A1111's lists, so the same files show up).

`.safetensors` is safe to read; the others are pickles, which `loading.load_state_dict` refuses unless the user
passes `--allow-pickle` (and then reads with `weights_only=True`). Compare with `path.suffix.lower()`.
"""

from __future__ import annotations

#: Safe weight files (read through safetensors).
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
#: Pickle-based weight files (PyTorch / Lightning checkpoints, diffusers' old `.bin`).
PICKLE_SUFFIXES: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin")
#: Every weight-file suffix the loading choke point accepts.
WEIGHT_SUFFIXES: tuple[str, ...] = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

#: models/Stable-diffusion lists these (A1111: .ckpt and .safetensors).
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt")
#: models/VAE lists every weight file.
VAE_SUFFIXES: tuple[str, ...] = WEIGHT_SUFFIXES
#: models/Lora (A1111: .pt, .ckpt, .safetensors).
LORA_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".ckpt")
#: embeddings/ (A1111: .pt, .bin, .safetensors).
EMBEDDING_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".bin")
#: models/ESRGAN and the other upscaler folders (spandrel's files: .pth, .pt, .ckpt, .safetensors).
UPSCALER_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".ckpt")
#: models/ControlNet lists every weight file.
CONTROLNET_SUFFIXES: tuple[str, ...] = WEIGHT_SUFFIXES


def is_weight_file(name: str) -> bool:
    """Whether a file name ends with a weight-file suffix (any case)."""
    return name.lower().endswith(WEIGHT_SUFFIXES)
