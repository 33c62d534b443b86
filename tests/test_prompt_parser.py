"""The A1111 prompt language: pinned (text, weight) lists and per-step schedules; no input crashes."""

import random

import pytest

from ldm_core.prompts.parser import (
    extract_extra_networks,
    get_prompt_schedule,
    parse_prompt_attention,
    split_and_prompts,
    text_at_step,
)


def _approx(runs):
    return [(t, pytest.approx(w)) for t, w in runs]


# ------------------------------------------------------------------------------------------- emphasis
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
        ("((word))", [("word", 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.5 )", [(" word ", 0.5)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        ("(x:-1)", [("x", -1.0)]),
        ("stray) and] here", [("stray) and] here", 1.0)]),
        ("time 10:30", [("time 10:30", 1.0)]),
        ("x:1.2) y", [("x:1.2) y", 1.0)]),  # a weight with no "(" is literal
        ("\\\\ and \\( \\)", [("\\ and ( )", 1.0)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_attention(prompt, expected):
    assert parse_prompt_attention(prompt) == _approx(expected)


def test_exact_a1111_float_values():
    # the exact products A1111 documents for its own example
    runs = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert runs["house"] == 1.5730000000000004
    assert runs["sky"] == 1.4641000000000006


def test_break():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    # BREAK is a marker even inside brackets, and two in a row stay two
    assert parse_prompt_attention("(x BREAK y) BREAK BREAK z") == _approx(
        [("x", 1.1), ("BREAK", -1.0), ("y", 1.1), ("BREAK", -1.0), ("BREAK", -1.0), ("z", 1.0)]
    )
    assert parse_prompt_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]


def test_invalid_weight_is_literal():
    assert parse_prompt_attention("(x:1.2.3)") == _approx([("x:1.2.3", 1.1)])


# ------------------------------------------------------------------------------------------- schedules
A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    # consecutive equal steps are merged (A1111 lists steps 2, 3 and 4 separately, all "male")
    ("[fe|||]male", [(1, "female"), (4, "male"), (5, "female"), (8, "male"), (9, "female"), (10, "male")]),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULES)
def test_a1111_schedule_examples(prompt, expected):
    assert get_prompt_schedule(prompt, 10) == expected


def test_half_of_twenty_steps_switches_after_step_10():
    sched = get_prompt_schedule("a [dog:cat:0.5]", 20)
    assert sched == [(10, "a dog"), (20, "a cat")]
    assert [text_at_step(sched, s) for s in (1, 10, 11, 20, 21)] == [
        "a dog",
        "a dog",
        "a cat",
        "a cat",
        "a cat",
    ]


@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        ("[a:b:0]", 10, [(10, "b")]),  # when 0: the new text from the first step
        ("[a:b:1]", 10, [(1, "a"), (10, "b")]),  # when 1: an absolute step
        ("[a:b:25]", 10, [(10, "a")]),  # past the end: never switches
        ("[a:b:0.25]", 10, [(2, "a"), (10, "b")]),  # int(2.5) = 2
        ("[a::3]", 5, [(3, "a"), (5, "")]),  # removal
        ("[a:b:2]", 0, [(1, "a")]),  # steps < 1 counts as 1
        ("[a|b|c]", 5, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]),  # option (step - 1) % 3
        ("[x [a|b]:y:2]", 4, [(1, "x a"), (2, "x b"), (4, "y")]),  # alternation inside editing
        ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),  # editing inside alternation
        ("(x [a:b:2]:1.2)", 3, [(2, "(x a:1.2)"), (3, "(x b:1.2)")]),  # inside emphasis, which stays
        ("\\[a:b:2\\]", 4, [(4, "\\[a:b:2\\]")]),  # escaped brackets are not syntax
        ("[a:b:c]", 4, [(4, "[a:b:c]")]),  # not a number: literal (an emphasis for the next step)
        ("[a|b:2]", 4, [(4, "[a|b:2]")]),  # mixed separators: literal
        ("[a:b:c:2]", 4, [(4, "[a:b:c:2]")]),  # too many parts: literal
        ("[a:(b:2]", 4, [(2, "a"), (4, "(b")]),  # an unclosed "(" inside is a literal character
        ("[a:b):2] c", 4, [(4, "[a:b):2] c")]),  # a stray ")" inside breaks the group: literal
    ],
)
def test_schedule_conventions(prompt, steps, expected):
    assert get_prompt_schedule(prompt, steps) == expected


def test_schedule_and_attention_together():
    sched = get_prompt_schedule("a (red:1.5) [car:(bike:0.8):0.5]", 4)
    assert [parse_prompt_attention(t) for _, t in sched] == [
        _approx([("a ", 1.0), ("red", 1.5), (" car", 1.0)]),
        _approx([("a ", 1.0), ("red", 1.5), (" ", 1.0), ("bike", 0.8)]),
    ]


def test_malformed_prompts_never_raise():
    rng = random.Random(0)
    alphabet = "ab :|()[]\\.1<>,"
    for _ in range(400):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        sched = get_prompt_schedule(prompt, 7)
        assert sched[-1][0] == 7 and all(a < b for (a, _), (b, _) in zip(sched, sched[1:], strict=False))
        for _, text in sched:
            assert parse_prompt_attention(text)
        assert split_and_prompts(prompt)
        extract_extra_networks(prompt)
    deep = "[" * 5000 + "x" + "]" * 10 + "(" * 3000
    assert get_prompt_schedule(deep, 3) == [(3, deep)]
    assert parse_prompt_attention(deep)[0][0] == "x"


# ------------------------------------------------------------------------------------ AND, networks
def test_and_parts():
    assert split_and_prompts("a cat AND a dog :0.5") == [("a cat", 1.0), ("a dog", 0.5)]
    assert split_and_prompts("a AND b:1.2 AND c : -0.5") == [("a", 1.0), ("b", 1.2), ("c", -0.5)]
    assert split_and_prompts("SAND and ANDROID (x:1.3)") == [("SAND and ANDROID (x:1.3)", 1.0)]
    assert split_and_prompts("") == [("", 1.0)]


def test_extra_networks():
    text, calls = extract_extra_networks("a cat, <lora:fluffy:0.8>, <lora:sub_dir-x:0.5:1.2> <hypernet:h:1>")
    assert text == "a cat, ,  "
    assert [(c.kind, c.name, c.positional) for c in calls] == [
        ("lora", "fluffy", ("0.8",)),
        ("lora", "sub_dir-x", ("0.5", "1.2")),
        ("hypernet", "h", ("1",)),
    ]
    assert calls[0].weights() == (0.8, 0.8)
    assert calls[1].weights() == (0.5, 1.2)
    assert calls[0].tag == "<lora:fluffy:0.8>"
    _, (named,) = extract_extra_networks("<lora:n:0.7:unet=0.2>")
    assert named.named == (("unet", "0.2"),) and named.weights() == (0.7, 0.2)
    _, (plain,) = extract_extra_networks("<lora:n>")
    assert plain.weights() == (1.0, 1.0)
    _, (bad,) = extract_extra_networks("<lora:n:strong>")
    with pytest.raises(ValueError, match="not a number"):
        bad.weights()
    assert extract_extra_networks("a <b> <:x> c") == ("a <b> <:x> c", [])
