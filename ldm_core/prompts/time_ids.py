"""SDXL micro-conditioning: the `time_ids` that go with the pooled text embedding into the UNet's `text_time`
addition embedding, for the SDXL base and the SDXL refiner.

- SDXL base: (original height, original width, crop top, crop left, target height, target width). A1111 uses
  the image size for both sizes and its options `sdxl_crop_top` / `sdxl_crop_left` for the crop.
- SDXL refiner (diffusers' `requires_aesthetics_score`): (original height, original width, crop top, crop
  left, aesthetic score). The prompt is conditioned on A1111's `sdxl_refiner_high_aesthetic_score` (6.0) and
  the negative prompt on `sdxl_refiner_low_aesthetic_score` (2.5), the same defaults as diffusers' img2img
  pipeline (`aesthetic_score`, `negative_aesthetic_score`).

The loop builds one UNet batch of [uncond?, cond_1..cond_k] groups; `sdxl_added_cond` returns the function it
calls per step with whether the first group is the unconditional one, so each group gets its own time ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: A1111's defaults of `sdxl_refiner_high_aesthetic_score` (prompt) and `..._low_...` (negative prompt).
HIGH_AESTHETIC_SCORE = 6.0
LOW_AESTHETIC_SCORE = 2.5

#: (whether the first group is the unconditional one, pooled embedding per group) -> UNet added_cond_kwargs
AddedCond = Callable[[bool, list[torch.Tensor]], dict[str, torch.Tensor]]


def sdxl_time_ids(
    family: str,
    width: int,
    height: int,
    *,
    crop_top: int = 0,
    crop_left: int = 0,
    aesthetic_score: float = HIGH_AESTHETIC_SCORE,
) -> list[float]:
    """The time ids of one prompt: 6 values for "sdxl", 5 for "sdxl-refiner" (see the module docstring)."""
    head = [float(height), float(width), float(crop_top), float(crop_left)]
    if family == "sdxl-refiner":
        return [*head, float(aesthetic_score)]
    if family == "sdxl":
        return [*head, float(height), float(width)]
    raise ValueError(f"{family!r} models take no SDXL time ids")


def sdxl_added_cond(
    family: str,
    width: int,
    height: int,
    *,
    crop_top: int = 0,
    crop_left: int = 0,
    high_aesthetic_score: float = HIGH_AESTHETIC_SCORE,
    low_aesthetic_score: float = LOW_AESTHETIC_SCORE,
    device: torch.device | str = "cpu",
) -> AddedCond:
    """The loop's added-conditioning function of an SDXL-family model: pooled embeddings as `text_embeds`
    and per group the time ids, the unconditional group's with `low_aesthetic_score` (refiner only)."""

    def ids(score: float) -> torch.Tensor:
        values = sdxl_time_ids(family, width, height, crop_top=crop_top, crop_left=crop_left, aesthetic_score=score)
        return torch.tensor([values], dtype=torch.float32, device=device)

    positive, negative = ids(high_aesthetic_score), ids(low_aesthetic_score)

    def added(uncond_first: bool, pooled: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = [negative if uncond_first and i == 0 else positive for i in range(len(pooled))]
        return {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(rows)}

    return added
