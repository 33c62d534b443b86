"""The A1111 prompt language: emphasis, prompt editing, alternation, AND, BREAK and extra-network tags.

A prompt goes through these steps, in this order (the order A1111 uses):

1. `extract_extra_networks`: `<lora:name:0.8>` and other `<kind:name:args>` tags are removed.
2. `split_and_prompts`: "a AND b :1.2" becomes composable sub-prompts, each with a weight.
3. `get_prompt_schedule`: each sub-prompt becomes per-step texts with `[from:to:when]` and `[a|b]` resolved.
4. `parse_prompt_attention`: each of those texts becomes (text, weight) runs, with BREAK markers.

Conventions (all pinned by tests):

* Steps are 1-based; a schedule is a list of (end_step, text): the text is used for every step up to and
  including end_step, after the previous entry's end_step. The last end_step is always `steps`.
* `[from:to:when]` uses `from` for steps <= W and `to` after, where W = int(when * steps) when when < 1
  (a fraction of the steps) and int(when) when when >= 1 (an absolute step), capped at `steps`.
  So when=0.5 with 20 steps uses `from` for steps 1-10 and `to` for steps 11-20; when=0 means `to` from
  the start. `[to:when]` is `[:to:when]` and `[from::when]` removes `from` after W.
* `[a|b|c]` uses option (step - 1) % 3 at each step: a at step 1, b at 2, c at 3, a at 4, ...
* Both nest, in each other and inside emphasis; emphasis brackets are left in the text for step 4.
* Malformed groups are literal text: an opening bracket without its partner is kept as a character and
  parsing goes on after it; a prompt nested deeper than `MAX_DEPTH` brackets is taken literally as a whole.
  No input raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1  # (x) multiplies attention by this, [x] divides by it
BREAK_WEIGHT = -1.0  # weight of the ("BREAK", BREAK_WEIGHT) marker from parse_prompt_attention
MAX_DEPTH = 100  # bracket nesting beyond this makes the schedule parser take the prompt literally

_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT_CLOSE_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_NUMBER_RE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_AND_RE = re.compile(r"\bAND\b")
_AND_WEIGHT_RE = re.compile(r"^(.*?)(?:\s*:\s*([+-]?(?:\d+\.?\d*|\.\d+)))?\s*$", re.S)
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


# ---------------------------------------------------------------------------------------------- emphasis


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) runs by its emphasis brackets.

    `(x)` multiplies x's weight by 1.1, `(x:1.3)` by 1.3, `[x]` divides it by 1.1; brackets nest and
    multiply. `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; a backslash before anything else is
    dropped (as A1111 does). An unclosed `(` or `[` applies to the rest of the prompt; a `)` or `]` with
    nothing to close is a literal character, as is `:1.3)` outside parentheses. Each word "BREAK" (upper
    case, on its own, spaces around it removed) becomes a ("BREAK", -1.0) marker, which no bracket
    changes. Adjacent runs of equal weight are merged and empty runs dropped; an empty prompt gives
    [("", 1.0)].

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []  # index in `runs` where each open bracket started
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    def add_plain(chunk: str) -> None:
        for i, part in enumerate(_BREAK_RE.split(chunk)):
            if i > 0:
                runs.append(["BREAK", BREAK_WEIGHT, True])
            runs.append([part, 1.0, False])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in "()[]\\":
                runs.append([nxt, 1.0, False])
                i += 2
            else:
                i += 1
        elif c == "(":
            round_open.append(len(runs))
            i += 1
        elif c == "[":
            square_open.append(len(runs))
            i += 1
        elif c == ")":
            if round_open:
                scale(round_open.pop(), ROUND_MULTIPLIER)
            else:
                runs.append([")", 1.0, False])
            i += 1
        elif c == "]":
            if square_open:
                scale(square_open.pop(), 1 / ROUND_MULTIPLIER)
            else:
                runs.append(["]", 1.0, False])
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE_RE.match(text, i)
            weight = _to_float(m.group(1)) if m else None
            if m and not round_open:
                runs.append([m.group(0), 1.0, False])  # "(x:1.3)" without its "(": all literal
                i = m.end()
            elif m and weight is not None:
                scale(round_open.pop(), weight)
                i = m.end()
            else:
                runs.append([":", 1.0, False])
                i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_plain(text[i:j])
            i = j
    for start in reversed(round_open):
        scale(start, ROUND_MULTIPLIER)
    for start in reversed(square_open):
        scale(start, 1 / ROUND_MULTIPLIER)

    merged: list[list] = []
    for run in runs:
        if run[0] == "" and not run[2]:
            continue
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    if not merged:
        return [("", 1.0)]
    return [(t, w) for t, w, _ in merged]


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------- schedule grammar
#
#   sequence  := (escape | group | char)*          stops at the enclosing group's separators
#   group     := "(" sequence ")"                  emphasis, kept verbatim
#              | "[" sequence "]"                  emphasis, kept verbatim
#              | "[" sequence (":" sequence)? ":" NUMBER "]"     prompt editing
#              | "[" sequence ("|" sequence)+ "]"                alternation
#
# A group that does not parse is a literal bracket character. Results are memoised by position, so
# backtracking stays polynomial.


@dataclass
class _Emphasis:
    open: str
    children: list
    close: str


@dataclass
class _Edit:
    before: list
    after: list
    when: float


@dataclass
class _Alternate:
    options: list[list]


class _TooDeep(Exception):
    pass


class _ScheduleParser:
    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[object | None, int]] = {}
        self.depth = 0

    def sequence(self, pos: int, stops: str, top: bool) -> tuple[list, int]:
        text, n = self.text, len(self.text)
        nodes: list = []
        buf: list[str] = []
        while pos < n:
            c = text[pos]
            if c == "\\":
                buf.append(text[pos : pos + 2])  # escapes stay verbatim for parse_prompt_attention
                pos += 2
                continue
            if c in "([":
                node, end = self.group(pos)
                if node is not None:
                    if buf:
                        nodes.append("".join(buf))
                        buf = []
                    nodes.append(node)
                    pos = end
                    continue
            elif c in stops or (not top and c in ")]"):
                break
            buf.append(c)
            pos += 1
        if buf:
            nodes.append("".join(buf))
        return nodes, pos

    def group(self, pos: int) -> tuple[object | None, int]:
        if pos in self.memo:
            return self.memo[pos]
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _TooDeep
        try:
            result = self._round(pos) if self.text[pos] == "(" else self._square(pos)
        finally:
            self.depth -= 1
        self.memo[pos] = result
        return result

    def _round(self, pos: int) -> tuple[object | None, int]:
        children, end = self.sequence(pos + 1, "", top=False)
        if end < len(self.text) and self.text[end] == ")":
            return _Emphasis("(", children, ")"), end + 1
        return None, pos

    def _square(self, pos: int) -> tuple[object | None, int]:
        text, n = self.text, len(self.text)
        parts: list[list] = []
        seps: list[str] = []
        p = pos + 1
        while True:
            children, p = self.sequence(p, ":|]", top=False)
            parts.append(children)
            if p >= n or text[p] == ")":
                return None, pos
            sep = text[p]
            p += 1
            if sep == "]":
                break
            seps.append(sep)
        if not seps:
            return _Emphasis("[", parts[0], "]"), p
        if all(s == "|" for s in seps):
            return _Alternate(parts), p
        if seps in ([":"], [":", ":"]):
            when = _number(parts[-1])
            if when is None:
                return None, pos
            before = parts[0] if len(parts) == 3 else []
            return _Edit(before, parts[-2], when), p
        return None, pos


def _number(nodes: list) -> float | None:
    if len(nodes) != 1 or not isinstance(nodes[0], str):
        return None
    m = _NUMBER_RE.fullmatch(nodes[0])
    return float(m.group(1)) if m else None


def _edit_step(when: float, steps: int) -> int:
    """The last step that uses the `from` text of an edit (0: `to` from the first step)."""
    value = when * steps if when < 1 else when
    return min(steps, int(value))


def _collect_steps(nodes: list, steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Emphasis):
            _collect_steps(node.children, steps, out)
        elif isinstance(node, _Edit):
            last = _edit_step(node.when, steps)
            if last >= 1:
                out.add(last)
            _collect_steps(node.before, steps, out)
            _collect_steps(node.after, steps, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _collect_steps(option, steps, out)


def _render(nodes: list, step: int, steps: int) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Emphasis):
            out.append(node.open + _render(node.children, step, steps) + node.close)
        elif isinstance(node, _Edit):
            chosen = node.before if step <= _edit_step(node.when, steps) else node.after
            out.append(_render(chosen, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def get_prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts `prompt` stands for over `steps` sampling steps, as (end_step, text) pairs.

    Steps are 1-based and the pairs cover 1..steps in order (see the module docstring for the exact
    convention); consecutive steps with the same text share one pair. Emphasis and escapes are left in
    the texts. `steps` below 1 counts as 1.

    >>> get_prompt_schedule("a [b:c:0.5]", 10)
    [(5, 'a b'), (10, 'a c')]
    """
    steps = max(1, int(steps))
    parser = _ScheduleParser(prompt)
    try:
        tree, _ = parser.sequence(0, "", top=True)
    except _TooDeep:
        return [(steps, prompt)]
    ends: set[int] = {steps}
    _collect_steps(tree, steps, ends)
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        text = _render(tree, end, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text of a `get_prompt_schedule` schedule at 1-based `step` (past the end: the last text)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


# ----------------------------------------------------------------------------------- AND, extra networks


def split_and_prompts(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt at each word "AND" into composable sub-prompts with their weights.

    A sub-prompt ending in ":<number>" takes that number as its weight (default 1.0); the text is
    stripped of surrounding whitespace. "AND" is split wherever it stands as a word, also inside
    brackets (as A1111 does).

    >>> split_and_prompts("a cat AND a dog :0.5")
    [('a cat', 1.0), ('a dog', 0.5)]
    """
    parts: list[tuple[str, float]] = []
    for sub in _AND_RE.split(prompt):
        m = _AND_WEIGHT_RE.match(sub)
        text, weight = (m.group(1), m.group(2)) if m else (sub, None)
        parts.append((text.strip(), float(weight) if weight is not None else 1.0))
    return parts


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One `<kind:name:arg:...>` tag. `positional` holds the arguments after the name (raw strings);
    `named` the `key=value` ones, in order, e.g. `<lora:x:0.8:unet=0.5>` has positional ("0.8",) and
    named (("unet", "0.5"),)."""

    kind: str
    name: str
    positional: tuple[str, ...] = ()
    named: tuple[tuple[str, str], ...] = ()
    tag: str = ""  # the tag as written

    def weights(self, default: float = 1.0) -> tuple[float, float]:
        """(text-encoder weight, UNet weight) as LoRA tags mean them: `<lora:n:w>` is (w, w),
        `<lora:n:te:unet>` is (te, unet), `te=`/`unet=` override. Raises ValueError for a non-number."""
        named = dict(self.named)

        def num(value: str) -> float:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{self.tag or self.name}: weight {value!r} is not a number") from None

        te = num(named.get("te", self.positional[0] if self.positional else str(default)))
        unet_default = self.positional[1] if len(self.positional) > 1 else str(te)
        unet = num(named.get("unet", unet_default))
        return te, unet


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove every `<kind:name[:args]>` tag (`kind` is a word such as lora, hypernet) from `prompt`.

    Returns the prompt with each tag replaced by nothing (surrounding text untouched, so commas and spaces
    stay as A1111 leaves them) and the calls in order of appearance.

    >>> text, calls = extract_extra_networks("a cat <lora:fluffy:0.8>")
    >>> text, calls[0].name, calls[0].weights()
    ('a cat ', 'fluffy', (0.8, 0.8))
    """
    calls: list[ExtraNetworkCall] = []

    def take(m: re.Match) -> str:
        name, *items = m.group(2).split(":")
        positional = tuple(item for item in items if "=" not in item)
        named = tuple((k, v) for k, _, v in (item.partition("=") for item in items if "=" in item))
        calls.append(ExtraNetworkCall(m.group(1), name, positional, named, m.group(0)))
        return ""

    return _EXTRA_NETWORK_RE.sub(take, prompt), calls
