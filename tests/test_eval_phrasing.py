"""The evaluation's held-out phrasing test (issue 15: prompts in structures the training captions never use,
reported beside the template phrasings): same scenes and seeds as `single`, other words."""

import random
from pathlib import Path

import torch

from ldm_core.train import shapes
from ldm_core.train.evaluate import HELDOUT_PHRASINGS, EvalOptions, evaluate, heldout_prompt

MODEL = Path(__file__).resolve().parents[1] / "models" / "builtin"


def test_heldout_phrasings_name_everything_and_are_not_training_captions():
    rng = random.Random(0)
    scenes = shapes.sample_scenes("phrasing-test", 40, n_objects=1)
    seen = set()
    for sc in scenes:
        o = sc.objects[0]
        p = heldout_prompt(o, sc.background, rng)
        assert o.colour in p and o.shape in p and sc.background in p
        seen.add(p.split(o.colour)[0])
        captions = {shapes.caption(sc, random.Random(i)) for i in range(200)}
        assert p not in captions
    assert len(seen) >= 3  # several structures drawn


def test_phrasing_section_runs_beside_single():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rep = evaluate(EvalOptions(model=MODEL, n=4, device="cpu", only=("single", "phrasing")))
    assert rep["phrasing"]["n"] == rep["single"]["n"] == 4
    prompts = [i["prompt"] for i in rep["phrasing"]["items"]]
    assert prompts != [i["prompt"] for i in rep["single"]["items"]]
    assert [i["want"] for i in rep["phrasing"]["items"]] == [i["want"] for i in rep["single"]["items"]]
    assert len(HELDOUT_PHRASINGS) >= 5


def test_no_background_section_names_only_colour_and_shape_and_scores_the_leak():
    """Issue 15's default model must draw what a new user types first ("a red circle"): the section's prompts
    name no background, and it reports how often the background took the object's own colour."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rep = evaluate(EvalOptions(model=MODEL, n=8, device="cpu", only=("no_background",)))["no_background"]
    assert rep["n"] == 4 and len(rep["items"]) == 4
    for item in rep["items"]:
        words = item["prompt"].split()
        assert "background" not in item["prompt"] and len(words) <= 3
        assert words[-1] in shapes.SHAPES and words[-2] in shapes.COLOUR_NAMES
    leaks = [i["background_is_object_colour"] for i in rep["items"]]
    assert rep["background_is_object_colour"] == sum(leaks) / 4
    assert 0.0 <= rep["found"] <= 1.0
