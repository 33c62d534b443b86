"""styles.csv: A1111's file format, applying styles by name, saving and deleting them."""

import pytest

from ldm_core.generation_requests import RequestError
from ldm_core.prompts.styles import PromptStyle, StyleStore, merge_style_text

CSV = (
    "\ufeffname,prompt,negative_prompt\n"
    'Cinematic,"{prompt}, cinematic, film grain","blurry, lowres"\n'
    "Sharp,sharp focus,\n"
    'Multi,"line one\nline two",\n'
)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(CSV, encoding="utf-8")
    return StyleStore(path)


def test_reads_a1111_file_with_quoted_fields(store):
    assert store.names() == ["Cinematic", "Sharp", "Multi"]
    assert store.get("Cinematic") == PromptStyle("Cinematic", "{prompt}, cinematic, film grain", "blurry, lowres")
    assert store.get("Multi").prompt == "line one\nline two"


def test_apply_placeholder_append_and_order(store):
    assert store.apply_styles("a cat", "", ["Cinematic"]) == (
        "a cat, cinematic, film grain",
        "blurry, lowres",
    )
    assert store.apply_styles("a cat", "ugly", ["Sharp"]) == ("a cat, sharp focus", "ugly")
    assert store.apply_styles("a cat", "ugly", ["Sharp", "Cinematic"]) == (
        "a cat, sharp focus, cinematic, film grain",
        "ugly, blurry, lowres",
    )
    assert store.apply_styles("", "", ["Sharp"]) == ("sharp focus", "")
    assert store.apply_styles("a cat", "n", []) == ("a cat", "n")


def test_merge_rules():
    assert merge_style_text("{prompt} in the rain, {prompt}", "dog") == "dog in the rain, dog"
    assert merge_style_text("", "dog") == "dog"
    assert merge_style_text("  ", "dog ") == "dog "
    assert merge_style_text("style", "  ") == "style"


def test_unknown_style_names_the_choices(store):
    with pytest.raises(RequestError) as err:
        store.get("Nope")
    assert err.value.field == "styles"
    assert "Nope" in err.value.message and "Cinematic, Sharp, Multi" in err.value.message


def test_unknown_styles_are_skipped_with_a_log_line_as_in_a1111(store, caplog):
    # A1111 clients send ["None"], [""] or Swagger's ["string"]; A1111 applies the styles it knows
    with caplog.at_level("WARNING", logger="ldm_core.prompts.styles"):
        got = store.apply_styles("a cat", "ugly", ["None", "", "string", "Sharp"])
    assert got == ("a cat, sharp focus", "ugly")
    assert "'string' is not defined" in caplog.text and "'None' is not defined" in caplog.text


def test_save_replace_delete_round_trip(store, tmp_path):
    store.save_style(PromptStyle("New, quoted", 'a "b", c', "x"))
    store.save_style(PromptStyle("Sharp", "very sharp", "soft"))  # replaces in place
    again = StyleStore(store.path)
    assert again.names() == ["Cinematic", "Sharp", "Multi", "New, quoted"]
    assert again.get("New, quoted") == PromptStyle("New, quoted", 'a "b", c', "x")
    assert again.get("Sharp") == PromptStyle("Sharp", "very sharp", "soft")
    assert again.get("Multi").prompt == "line one\nline two"
    again.delete_style("Cinematic")
    assert StyleStore(store.path).names() == ["Sharp", "Multi", "New, quoted"]
    with pytest.raises(RequestError):
        again.delete_style("Cinematic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styles.csv"]  # no temp files left


def test_extra_columns_kept_and_hand_edits_seen(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt,description\nA,pa,na,first\n", encoding="utf-8")
    store = StyleStore(path)
    store.save_style(PromptStyle("B", "pb", "nb"))
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "name,prompt,negative_prompt,description"
    assert "A,pa,na,first" in text
    path.write_text("name,prompt,negative_prompt\nC,pc,nc,\nhand edited,x,y\n", encoding="utf-8")
    assert store.names() == ["C", "hand edited"]


def test_missing_file_and_bad_name(tmp_path):
    store = StyleStore(tmp_path / "none" / "styles.csv")
    assert store.names() == []
    with pytest.raises(RequestError, match="no styles are defined"):
        store.get("x")
    with pytest.raises(RequestError, match="needs a name"):
        store.save_style(PromptStyle("  ", "p"))
    store.save_style(PromptStyle("first", "p"))
    assert store.path.exists() and StyleStore(store.path).names() == ["first"]
