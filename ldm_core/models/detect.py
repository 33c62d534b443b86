"""What kind of Stable Diffusion checkpoint a state dict is, from its key names and tensor shapes.

Detection never looks at file names. Tables below say which keys identify each family (like diffusers'
`CHECKPOINT_KEY_NAMES`) and which keys betray files that are not checkpoints at all (LoRAs, VAEs, ...), so a
misplaced file gets a helpful message.

What keys cannot tell, a rule decides (override it with a sidecar file, see `ldm_core.models.sidecar`):

- prediction type: epsilon for SD 1.x, SDXL and the SDXL refiner; for SD 2.x non-inpainting checkpoints
  **v-prediction**, because the SD 2.0-v / 2.1 768 models (and most SD2 fine-tunes) are v-models, while the 512 "base"
  models are epsilon and need a sidecar `{"prediction_type": "epsilon"}` (or A1111's `v2-inference.yaml`
  next to them). SD 2.x inpainting is epsilon. A checkpoint that carries a `v_pred` marker key (some
  SDXL v-pred releases do) is v-prediction whatever its family.
- zero terminal SNR: only when the checkpoint carries a `ztsnr` marker key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

#: "sdxl-refiner" is Stability's SDXL refiner: a 4-level UNet conditioned on OpenCLIP ViT-bigG alone, whose
#: time ids hold an aesthetic score instead of the target size (`ldm_core.prompts.time_ids`).
Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
PredictionType = Literal["epsilon", "v_prediction"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sdxl-refiner")
#: Families with SDXL's pooled text embedding and micro-conditioning time ids (UNet `text_time` embedding).
SDXL_FAMILIES: tuple[str, ...] = ("sdxl", "sdxl-refiner")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"

#: The VQ autoencoder's codebook (LDSR's first stage; SD's KL autoencoders have none).
CODEBOOK_KEY = VAE_PREFIX + "quantize.embedding.weight"
#: The SD x4 upscaler's noise-level embedding (an nn.Embedding; SDXL's `label_emb.0.0.` is a linear layer).
NOISE_LEVEL_KEY = UNET_PREFIX + "label_emb.weight"

LDSR = "ldsr"
X4 = "sd-x4-upscaler"
#: Diffusion upscaler files with an SD-style UNet that are not checkpoints (read by `ldm_core.models.sr_files`):
#: kind -> (UNet input channels, marker key, what it is, where it goes).
SR_FILES: dict[str, tuple[int, str, str, str]] = {
    LDSR: (6, CODEBOOK_KEY, "an LDSR upscaler", "models/LDSR"),
    X4: (7, NOISE_LEVEL_KEY, "the SD x4 upscaler", "models/SD-Upscale"),
}

#: Text-encoder prefixes of the original layouts, per family: (prefix, style). "hf_clip" is OpenAI CLIP stored
#: with transformers' key names; "open_clip" is OpenCLIP's own layout (fused q/k/v `in_proj`).
TEXT_ENCODER_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("cond_stage_model.transformer.", "hf_clip"),),
    "sd2": (("cond_stage_model.model.", "open_clip"),),
    "sdxl": (
        ("conditioner.embedders.0.transformer.", "hf_clip"),
        ("conditioner.embedders.1.model.", "open_clip"),
    ),
    "sdxl-refiner": (("conditioner.embedders.0.model.", "open_clip"),),  # bigG only, stored first
}

#: Family signatures of original-layout checkpoints, tried in order: (family, key, shape test or None).
FAMILY_KEYS: tuple[tuple[Family, str, Callable[[tuple[int, ...]], bool] | None], ...] = (
    # text encoders: the most direct evidence
    ("sdxl", "conditioner.embedders.1.model.token_embedding.weight", None),  # OpenCLIP ViT-bigG (2nd encoder)
    ("sdxl-refiner", "conditioner.embedders.0.model.token_embedding.weight", None),  # bigG as the only encoder
    ("sd2", "cond_stage_model.model.token_embedding.weight", None),  # OpenCLIP ViT-H
    ("sd1", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", None),  # CLIP ViT-L
    (
        "sd1",
        "cond_stage_model.transformer.embeddings.token_embedding.weight",
        None,
    ),  # old transformers naming
    # UNet-only evidence (files without text encoders)
    (  # the refiner attends to bigG's 1280-wide states; the base to CLIP-L + bigG (2048)
        "sdxl-refiner",
        UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        lambda s: s[-1] == 1280,
    ),
    ("sdxl", UNET_PREFIX + "label_emb.0.0.weight", None),  # text_time addition embedding
    ("sd2", UNET_PREFIX + "input_blocks.1.1.proj_in.weight", lambda s: len(s) == 2),  # linear projection
    ("sd2", UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", lambda s: s[-1] == 1024),
    ("sd1", UNET_IN_KEY, None),
)

#: Marker keys some releases add for what shapes cannot show.
V_PREDICTION_MARKER = "v_pred"
ZERO_SNR_MARKER = "ztsnr"

#: UNet input channels: 4 = text-to-image, 9 = inpainting (4 latent + 1 mask + 4 masked-image latent).
INPAINT_IN_CHANNELS = 9

#: Files that are not SD checkpoints: (what it is, key prefixes or fragments, match mode).
NOT_A_CHECKPOINT: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "an SD3/Flux-style transformer model (not SD1/SD2/SDXL)",
        (
            "joint_blocks.",
            "double_blocks.",
            "model.diffusion_model.joint_blocks.",
            "model.diffusion_model.double_blocks.",
        ),
        "prefix",
    ),
    (
        "a LoRA (put it in models/Lora)",
        ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", ".hada_w1"),
        "contains",
    ),
    (
        "a ControlNet (put it in models/ControlNet)",
        ("control_model.", "controlnet_cond_embedding.", "input_hint_block."),
        "prefix",
    ),
    (
        "a textual-inversion embedding (put it in embeddings/)",
        ("emb_params", "string_to_param", "clip_l", "clip_g"),
        "prefix",
    ),
    (
        "a VAE (put it in models/VAE)",
        ("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.encoder."),
        "prefix",
    ),
    (
        "a diffusers-layout UNet weights file (load its diffusers folder instead)",
        ("conv_in.weight", "down_blocks.0."),
        "prefix",
    ),
)


class UnsupportedCheckpointError(ValueError):
    """The state dict is not an SD 1.x / 2.x / SDXL (base or refiner) checkpoint this project can load."""


@dataclass(frozen=True)
class CheckpointKind:
    """What a checkpoint is. `family` picks the text encoders and shipped configs; `inpaint` means a
    9-channel UNet; `prediction_type` is what the UNet predicts; `zero_terminal_snr` asks the scheduler to
    rescale betas to zero terminal SNR."""

    family: Family
    inpaint: bool = False
    prediction_type: PredictionType = "epsilon"
    zero_terminal_snr: bool = False

    @property
    def config_variant(self) -> str:
        """The shipped config folder under `ldm_core/models/configs/` this kind is built from."""
        if self.inpaint:
            return f"{self.family}-inpaint"  # no refiner is an inpainting model (detection refuses one)
        if self.family == "sd2" and self.prediction_type == "epsilon":
            return "sd2-base"
        return self.family

    @property
    def pipeline_class_name(self) -> str:
        """The diffusers pipeline class that matches this kind."""
        if self.family == "sdxl-refiner":
            return "StableDiffusionXLImg2ImgPipeline"
        xl = "XL" if self.family == "sdxl" else ""
        return f"StableDiffusion{xl}{'Inpaint' if self.inpaint else ''}Pipeline"

    def with_overrides(self, family: str | None = None, prediction_type: str | None = None) -> CheckpointKind:
        """A copy with what a sidecar or setting says; None keeps the detected value."""
        return replace(
            self,
            family=family or self.family,  # type: ignore[arg-type]
            prediction_type=prediction_type or self.prediction_type,  # type: ignore[arg-type]
        )


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def describe_non_checkpoint(keys: Mapping[str, Any] | list[str]) -> str | None:
    """What a state dict looks like when it is not a full SD checkpoint (e.g. "a LoRA ..."), else None."""
    names = list(keys)
    for label, markers, mode in NOT_A_CHECKPOINT:
        if mode == "prefix":
            hit = any(k.startswith(m) for k in names for m in markers)
        else:
            hit = any(m in k for k in names for m in markers)
        if hit:
            return label
    return None


def sr_kind(state_dict_or_shapes: Mapping[str, Any]) -> str | None:
    """`LDSR`, `X4` or None for a state dict or a safetensors header's {key: shape}."""
    sd = state_dict_or_shapes
    if UNET_IN_KEY not in sd:
        return None
    in_ch = _shape(sd[UNET_IN_KEY])[1]
    return next((k for k, (ch, key, _, _) in SR_FILES.items() if in_ch == ch and key in sd), None)


def detect_family(state_dict_or_shapes: Mapping[str, Any]) -> Family:
    """The family of an original-layout state dict (values: tensors or shapes), from `FAMILY_KEYS`."""
    sd = state_dict_or_shapes
    if UNET_IN_KEY not in sd:
        what = describe_non_checkpoint(sd)
        raise UnsupportedCheckpointError(
            f"not a Stable Diffusion checkpoint: it looks like {what}"
            if what
            else "not a Stable Diffusion checkpoint: no UNet weights (model.diffusion_model.*) found"
        )
    for family, key, test in FAMILY_KEYS:
        if key in sd and (test is None or test(_shape(sd[key]))):
            return family
    raise UnsupportedCheckpointError("not a recognised SD 1.x / 2.x / SDXL checkpoint")  # pragma: no cover


def detect_checkpoint(state_dict_or_shapes: Mapping[str, Any]) -> CheckpointKind:
    """Detect family, inpainting and (by the module's rules) prediction type of an original-layout state dict.

    `state_dict_or_shapes` maps key -> tensor, or key -> shape tuple (as read from a safetensors header).
    Raises `UnsupportedCheckpointError` for anything that is not an SD 1.x / 2.x / SDXL checkpoint.
    """
    sd = state_dict_or_shapes
    family = detect_family(sd)
    in_ch = _shape(sd[UNET_IN_KEY])[1]
    upscaler = sr_kind(sd)
    if upscaler is not None:
        what, folder = SR_FILES[upscaler][2:]
        raise UnsupportedCheckpointError(f"{what}, not a checkpoint: put it in {folder}")
    if in_ch not in (4, INPAINT_IN_CHANNELS):
        raise UnsupportedCheckpointError(
            f"UNet takes {in_ch} input channels; supported are 4 (text-to-image) and 9 (inpainting) "
            "(8 is InstructPix2Pix, 5 a depth model)"
        )
    inpaint = in_ch == INPAINT_IN_CHANNELS
    if inpaint and family == "sdxl-refiner":
        raise UnsupportedCheckpointError("an SDXL refiner with a 9-channel (inpainting) UNet is not supported")
    if V_PREDICTION_MARKER in sd:
        prediction: PredictionType = "v_prediction"
    elif family == "sd2" and not inpaint:
        prediction = "v_prediction"
    else:
        prediction = "epsilon"
    return CheckpointKind(family, inpaint, prediction, ZERO_SNR_MARKER in sd)


#: Family of a diffusers folder from its UNet config, tried in order: (family, test on the config).
DIFFUSERS_FAMILY_RULES: tuple[tuple[Family, Callable[[Mapping[str, Any]], bool]], ...] = (
    ("sdxl-refiner", lambda c: c.get("addition_embed_type") == "text_time" and c.get("cross_attention_dim") == 1280),
    ("sdxl", lambda c: c.get("addition_embed_type") == "text_time"),
    ("sdxl", lambda c: c.get("cross_attention_dim") == 2048),
    ("sd2", lambda c: c.get("cross_attention_dim") == 1024),
    ("sd1", lambda c: c.get("cross_attention_dim") == 768),
    ("sd2", lambda c: bool(c.get("use_linear_projection"))),  # small custom models: structural fallback
    ("sd1", lambda c: True),
)


def detect_diffusers(
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None = None,
    model_index: Mapping[str, Any] | None = None,
) -> CheckpointKind:
    """The kind of a diffusers folder from its unet config and scheduler config (which, unlike a single
    file, records the prediction type). A `model_index` that sets `requires_aesthetics_score` (the
    refiner's pipeline flag, which small refiners of other widths carry too) makes an SDXL UNet a refiner."""
    family = next(f for f, test in DIFFUSERS_FAMILY_RULES if test(unet_config))
    if family == "sdxl" and (model_index or {}).get("requires_aesthetics_score"):
        family = "sdxl-refiner"
    sched = scheduler_config or {}
    prediction = sched.get("prediction_type") or "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedCheckpointError(f"scheduler prediction_type {prediction!r} is not supported")
    return CheckpointKind(
        family,
        unet_config.get("in_channels", 4) == INPAINT_IN_CHANNELS,
        prediction,
        bool(sched.get("rescale_betas_zero_snr", False)),
    )
