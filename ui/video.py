"""The Video tab: a clip from a prompt (text-to-video), from a start image (image-to-video) or from a source clip
(video-to-video), with an AnimateDiff motion module from `models/AnimateDiff/` (ldm_core.video).

Its options are sd-webui-animatediff's (the API takes the same ones as `alwayson_scripts.AnimateDiff`): frames,
fps, context (frames the module sees at once), overlap, stride, closed loop, output formats and loop count.
The motion module menu also lists Stable Video Diffusion folders (models/SVD/), which make a clip from the start
image with their own options (motion bucket, noise augmentation).
The result panel plays the clip (MP4/WebM in a video player, GIF/WebP as an animated image) above the frames.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import gradio as gr

from ldm_core.video.clips import CLIP_TYPES
from ldm_core.video.free_init import FILTERS as FREEINIT_FILTERS
from ldm_core.video.options import MAX_FRAMES

from .common import UiContext
from .widgets import GenerationTab, TopBar, build_generation_tab

FORMATS = ["GIF", "MP4", "WEBP", "WEBM", "PNG", "TXT"]
CLOSED_LOOP = ["N", "R-P", "R+P", "A"]


def _module_names(ctx: UiContext) -> list[str]:
    return ctx.engine.motion_modules.names()


def _motion_section(ctx: UiContext, tab: GenerationTab) -> None:
    names = _module_names(ctx)
    with gr.Accordion("Motion", open=True, elem_id="video_motion"):
        with gr.Row():
            module = gr.Dropdown(
                names,
                value=names[0] if names else None,
                label="Motion module",
                allow_custom_value=True,
                elem_id="video_motion_module",
                info=None if names else "None installed: put one in models/AnimateDiff",
            )
            refresh = gr.Button("↻", elem_id="video_motion_refresh", scale=0, min_width=40)
        with gr.Row():
            frames = gr.Slider(1, MAX_FRAMES, value=16, step=1, label="Frames", elem_id="video_length")
            fps = gr.Slider(1, 60, value=8, step=1, label="FPS", elem_id="video_fps")
        with gr.Row():
            context = gr.Slider(1, 32, value=16, step=1, label="Context (frames at once)", elem_id="video_context")
            overlap = gr.Slider(-1, 31, value=-1, step=1, label="Overlap (-1: context / 4)", elem_id="video_overlap")
            stride = gr.Slider(1, 8, value=1, step=1, label="Stride", elem_id="video_stride")
        with gr.Row():
            closed = gr.Radio(CLOSED_LOOP, value="R-P", label="Closed loop", elem_id="video_closed_loop")
            loops = gr.Number(0, precision=0, minimum=0, label="Loops (0: forever)", elem_id="video_loop_number")
            shared = gr.Slider(
                0.0,
                1.0,
                value=0.0,
                step=0.05,
                label="Shared noise",
                info="share of each frame's starting noise taken from the first frame's: frames start alike",
                elem_id="video_shared_noise",
            )
        with gr.Row():  # the module's timeline (AnimateDiff-Evolved's start/end percent and effect)
            m_start = gr.Slider(
                0.0, 1.0, value=0.0, step=0.05, label="Motion start", elem_id="video_motion_start_percent"
            )
            m_end = gr.Slider(
                0.0,
                1.0,
                value=1.0,
                step=0.05,
                label="Motion end",
                info="the module runs from start to end of the denoising; the model alone after it: crisper frames",
                elem_id="video_motion_end_percent",
            )
            m_effect = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Motion effect", elem_id="video_motion_effect")
        with gr.Row():  # text-to-video only (ldm_core.video.free_init)
            freeinit = gr.Checkbox(
                False,
                label="FreeInit",
                info="sample again from the clip's own low frequencies: steadier clips, iterations x the time",
                elem_id="video_freeinit_enable",
            )
            fi_iters = gr.Slider(2, 5, value=3, step=1, label="FreeInit iterations", elem_id="video_freeinit_iters")
            fi_filter = gr.Dropdown(list(FREEINIT_FILTERS), value="butterworth", label="Filter",
                                    elem_id="video_freeinit_filter")
            fi_ds = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="Spatial stop (ds)", elem_id="video_freeinit_ds")
            fi_dt = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="Temporal stop (dt)", elem_id="video_freeinit_dt")
        formats = gr.CheckboxGroup(FORMATS, value=["GIF", "MP4"], label="Save as", elem_id="video_format")
    with gr.Accordion("Start from an image or a clip", open=False, elem_id="video_start"):
        image = gr.Image(label="Start image (image-to-video)", type="pil", elem_id="video_init_image", height=200)
        clip = gr.File(
            label="Source clip (video-to-video: GIF, WebP, MP4, WebM)",
            file_types=[".gif", ".webp", ".mp4", ".webm", ".mov", ".mkv"],
            type="filepath",
            elem_id="video_source",
        )
        with gr.Row():
            strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id="video_strength")
            power = gr.Slider(0.0, 4.0, value=1.0, step=0.1, label="Latent power", elem_id="video_latent_power")
            scale = gr.Slider(1.0, 64.0, value=32.0, step=1.0, label="Latent scale", elem_id="video_latent_scale")
        with gr.Row():  # Stable Video Diffusion models only (chosen in the motion module menu)
            bucket = gr.Slider(0, 255, value=127, step=1, label="Motion bucket (SVD)", elem_id="video_motion_bucket")
            aug = gr.Slider(
                0.0, 1.0, value=0.02, step=0.01, label="Noise augmentation (SVD)", elem_id="video_noise_aug"
            )
    tab.image = image
    tab.fields.update(
        video_model=module,
        video_length=frames,
        video_fps=fps,
        video_context=context,
        video_overlap=overlap,
        video_stride=stride,
        video_closed_loop=closed,
        video_loop_number=loops,
        video_shared_noise=shared,
        video_motion_start_percent=m_start,
        video_motion_end_percent=m_end,
        video_motion_effect=m_effect,
        video_freeinit_enable=freeinit,
        video_freeinit_iters=fi_iters,
        video_freeinit_filter=fi_filter,
        video_freeinit_ds=fi_ds,
        video_freeinit_dt=fi_dt,
        video_format=formats,
        init_image=image,
        video_source=clip,
        denoising_strength=strength,
        video_latent_power=power,
        video_latent_scale=scale,
        video_motion_bucket_id=bucket,
        video_noise_aug_strength=aug,
    )

    def refreshed(current):
        names = _module_names(ctx)
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    refresh.click(refreshed, [module], [module], queue=False)
    tab.defaults[module] = lambda: refreshed(None)


def _on_disk(clip):
    """The clip with a file to serve: its saved file, or a temporary copy when saving is off."""
    if clip.path is None:
        ext = CLIP_TYPES[clip.format][0]
        with tempfile.NamedTemporaryFile(prefix="ldm-clip-", suffix=f".{ext}", delete=False) as f:
            f.write(clip.data)
        clip = dataclasses.replace(clip, path=Path(f.name))
    return clip


def _player_section(tab: GenerationTab) -> None:
    video = gr.Video(label="Clip", elem_id="video_player", visible=False, autoplay=True, loop=True, height=320)
    animated = gr.Image(label="Clip", elem_id="video_animated", visible=False, type="filepath", height=320)
    tab.extra_outputs = [video, animated]

    def updates(result) -> dict:
        clips = [_on_disk(c) for c in getattr(result, "videos", [])]
        playable = next((c for c in clips if c.format in ("MP4", "WEBM")), None)
        still = next((c for c in clips if c.format in ("GIF", "WEBP")), None)
        hidden_video, hidden_image = gr.Video(value=None, visible=False), gr.Image(value=None, visible=False)
        return {
            video: gr.Video(value=str(playable.path), visible=True) if playable else hidden_video,
            animated: gr.Image(value=str(still.path), visible=playable is None) if still else hidden_image,
        }

    tab.result_updates = updates


def build(ctx: UiContext, top: TopBar) -> GenerationTab:
    """The Video tab (call inside a gr.Tab)."""
    tab = build_generation_tab(
        ctx,
        top,
        "video",
        inputs_section=lambda t: _motion_section(ctx, t),
        results_section=_player_section,
    )
    batch = tab.fields.get("batch_size")
    if batch is not None:  # the frames are the batch
        batch.visible = False
    return tab
