"""Stable Video Diffusion: image-to-video with a diffusers `StableVideoDiffusionPipeline` folder (SVD, SVD-XT)
that the user puts in `models/SVD/` (or `models/AnimateDiff/`). It is listed with the motion modules and chosen
the same way (`animatediff.model`), and runs from the job's start image with its own options: `fps` (the
frame-rate conditioning), `motion_bucket_id` (more motion above 127), `noise_aug_strength` (noise added to the
start image), CFG rising from 1 to the request's `cfg_scale` over the frames, the request's steps and seed.

SVD is its own 3-D UNet conditioned on a CLIP image embedding, so it runs through diffusers' pipeline (offline,
safetensors unless pickles are allowed), not through the SD loop; the prompt and the checkpoint menu do not apply
to it. Progress is reported per step; an interrupt stops the job before decoding (no partial clip).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from ..models.pipelines import PipelineFolder
from ..progress import Interrupted

log = logging.getLogger(__name__)
PIPELINE_CLASS = "StableVideoDiffusionPipeline"


def is_svd_folder(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError):
        return False


class SVDModel(PipelineFolder):
    """One SVD folder, loaded on first use and kept."""

    field = "animatediff.model"

    def pipeline_class(self):
        from diffusers import StableVideoDiffusionPipeline

        return StableVideoDiffusionPipeline

    def frames(
        self,
        image: Image.Image,
        *,
        frames: int,
        width: int,
        height: int,
        steps: int,
        seed: int,
        cfg_scale: float,
        fps: float,
        motion_bucket_id: int,
        noise_aug_strength: float,
        check_cancel=None,
        on_step=None,
    ) -> list[Image.Image]:
        """The clip's frames from `image` (see the module doc). `check_cancel()` raises Interrupted to stop;
        `on_step(done, total)` reports progress."""
        pipe = self.pipeline()

        def callback(_pipe, i, _t, kwargs):
            if on_step is not None:
                on_step(i + 1, steps)
            if check_cancel is not None:
                check_cancel()
            return kwargs

        try:
            out = pipe(
                image.convert("RGB"),
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=steps,
                min_guidance_scale=1.0,
                max_guidance_scale=max(1.0, float(cfg_scale)),
                fps=max(1, round(fps)),
                motion_bucket_id=motion_bucket_id,
                noise_aug_strength=noise_aug_strength,
                decode_chunk_size=min(8, frames),
                generator=torch.Generator(device="cpu").manual_seed(int(seed) % 2**63),
                callback_on_step_end=callback,
                output_type="pil",
            )
        except Interrupted:
            raise
        return list(out.frames[0])
