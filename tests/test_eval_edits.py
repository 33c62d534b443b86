"""The evaluation's img2img and inpaint tests through the engine (`eval --edits engine`): the path the img2img
and inpaint tabs take, with the model's recommended CFG rescale, rather than diffusers' pipelines."""

import json
from pathlib import Path

import pytest

from ldm_core.engine import Engine
from ldm_core.generation_requests import Img2ImgRequest, InpaintRequest
from ldm_core.train.evaluate import USER_INPAINT_PROMPTS, EvalOptions, Evaluator, freehand_mask

MODEL = Path(__file__).resolve().parents[1] / "models" / "builtin"


def test_eval_edits_through_the_engine(tmp_path, monkeypatch):
    from ldm_core.train.__main__ import main

    seen, prompts = [], []
    real = Engine.generate

    def spy(self, request, ctx=None):
        seen.append((type(request), request.rescale_cfg))
        prompts.append(request.prompt)
        return real(self, request, ctx)

    monkeypatch.setattr(Engine, "generate", spy)
    out = tmp_path / "rep.json"
    args = ["eval", "--model", str(MODEL), "--n", "16", "--device", "cpu", "--only", "img2img,inpaint"]
    assert main(args + ["--edits", "engine", "--rescale-cfg", "0", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["edits"] == "engine" and rep["img2img"]["n"] == 4 and rep["inpaint"]["n"] == 4
    kinds = [k for k, _ in seen]
    # two strengths; inpaint with square masks and with freehand masks (phrased as users type)
    assert kinds.count(Img2ImgRequest) == 8 and kinds.count(InpaintRequest) == 8
    inpaint_prompts = [p for (k, _), p in zip(seen, prompts, strict=True) if k is InpaintRequest]
    assert inpaint_prompts[:4] == ["a blue star"] * 4
    assert set(inpaint_prompts[4:]) <= set(USER_INPAINT_PROMPTS) and len(set(inpaint_prompts[4:])) == 4
    assert {"blue_star_in_drawn_mask", "drawn_original_object_kept"} <= set(rep["inpaint"])
    assert {r for _, r in seen} == {0.0}  # --rescale-cfg reaches the engine's requests
    assert rep["img2img"]["follow_prompt_at_0.9"] > 0  # the pictures come out readable
    i = rep["img2img"]  # which part of the layout each strength keeps: the layout is all three at once
    for s in (0.3, 0.9):
        parts = [i[f"keep_{part}_at_{s}"] for part in ("shape", "colour", "position")]
        assert i[f"keep_layout_at_{s}"] <= min(parts) and max(parts) <= 1


def test_eval_edits_must_name_a_path():
    with pytest.raises(ValueError, match="edits"):
        Evaluator(EvalOptions(model=MODEL, device="cpu", edits="comfy"), pipes=(None, None, None))


def test_freehand_masks_cover_an_area_around_their_centre():
    import random

    import numpy as np

    for i in range(20):
        m = np.asarray(freehand_mask(64, (0.75, 0.25), random.Random(i))) >= 128
        assert 0.1 < m.mean() < 0.45  # a scribbled patch, not the whole image
        assert m[16, 48]  # its centre is painted
        assert not m[48:, :16].any()  # the opposite corner is not
