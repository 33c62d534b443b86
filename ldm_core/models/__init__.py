"""Models, offline: the registry of checkpoint/VAE folders, detection of a checkpoint's kind from its keys and
shapes, the one loading choke point, original-layout <-> diffusers conversion, shipped configs and tokenizers.

Import from here: `ModelRegistry`, `ModelEntry`, `load_model`, `load_vae`, `LoadedModel`, `CheckpointKind`,
`detect_checkpoint`, `load_state_dict`, `ModelFileError`, `UnknownModelError`, `file_sha256`, ...
"""

from .detect import CheckpointKind, UnsupportedCheckpointError, detect_checkpoint, detect_diffusers
from .hashes import HashCache, file_sha256, folder_sha256, short_hash
from .loading import (
    LoadedModel,
    ModelFileError,
    check_weights_file,
    inspect_model,
    load_model,
    load_shipped_tokenizer,
    load_state_dict,
    load_vae,
    read_tensor_shapes,
)
from .registry import ModelEntry, ModelRegistry, UnknownModelError
from .sidecar import Sidecar, SidecarError, read_sidecar
from .single_file import (
    ConvertedCheckpoint,
    LayoutError,
    convert_checkpoint,
    save_single_file,
    to_original_state_dict,
)

__all__ = [
    "CheckpointKind",
    "ConvertedCheckpoint",
    "HashCache",
    "LayoutError",
    "LoadedModel",
    "ModelEntry",
    "ModelFileError",
    "ModelRegistry",
    "Sidecar",
    "SidecarError",
    "UnknownModelError",
    "UnsupportedCheckpointError",
    "check_weights_file",
    "convert_checkpoint",
    "detect_checkpoint",
    "detect_diffusers",
    "file_sha256",
    "folder_sha256",
    "inspect_model",
    "load_model",
    "load_shipped_tokenizer",
    "load_state_dict",
    "load_vae",
    "read_sidecar",
    "read_tensor_shapes",
    "save_single_file",
    "short_hash",
    "to_original_state_dict",
]
