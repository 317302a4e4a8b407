"""Final-answer extraction from untrusted model text.

Everything here is plain string scanning with bounded work: no regular expression can backtrack
over the whole output, no expression is evaluated, and the cost is linear in the length of the
text (1 MB of text is scanned in milliseconds). The extracted string is handed to
`math-verify` (in a separate worker process, see :mod:`creditlib.eval.verify`) for equivalence.

Order of preference (the first that yields an answer wins):

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\framebox{...}`` with balanced braces
   (``\\{`` and ``\\}`` are literal braces and do not count); also ``\\boxed 5``;
2. GSM8K's ``#### 42`` (the text after the last ``####`` on its line);
3. "the (final) answer is ..." (the rest of that sentence);
4. optionally, the last number in the last part of the text.

The length cap :data:`MAX_ANSWER_CHARS` holds for every route: a stated answer that is longer
(the last box, the ``####`` line, the "answer is" sentence) means the text has *no* answer, and
the last-number fallback is not consulted (it would otherwise pick a number out of the over-long
answer: ``\\boxed{<1001 characters> 123}`` is not the answer 123); a number longer than the cap
is not an answer either.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "last_boxed", "strip_answer", "MAX_ANSWER_CHARS"]

#: Longest answer (in characters) that extraction will return. Real answers are short (the
#: longest gold answer in the six benchmarks is ~200 characters); a longer "answer" is treated
#: as no answer, which also bounds the work that verification can be asked to do.
MAX_ANSWER_CHARS = 1000

_BOX_COMMANDS = ("\\boxed", "\\fbox", "\\framebox")
_MAX_BOX_CANDIDATES = 16  # boxed commands tried from the right before giving up
_TAIL_CHARS = 4000  # "answer is" / last-number search looks only at the end of the text

# A finder's verdict "an answer is stated here but it is longer than the cap" (as opposed to None,
# "no answer stated"): extraction then returns None without trying the later routes.
_TOO_LONG = object()

_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _match_brace(text: str, open_pos: int, limit: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, or -1 if not closed within ``limit``."""
    depth = 0
    end = min(len(text), open_pos + limit + 2)
    i = open_pos
    while i < end:
        ch = text[i]
        if ch == "\\":  # skip escaped characters: \{ \} \\ are literal
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _last_box(text: str, max_chars: int):
    """Content of the last complete box, ``None`` (no box), or ``_TOO_LONG`` when the last box whose
    content is not a truncated end of text holds more than ``max_chars`` characters."""
    # Candidate positions from the right: at most _MAX_BOX_CANDIDATES of them, so the total work
    # is bounded by _MAX_BOX_CANDIDATES * max_chars whatever the text holds.
    starts: list[tuple[int, str]] = []
    for cmd in _BOX_COMMANDS:
        pos = len(text)
        for _ in range(_MAX_BOX_CANDIDATES):
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            after = pos + len(cmd)
            # \fbox must not match \fboxsep etc.; \boxed must not match \boxedfoo
            if after < len(text) and (text[after].isalpha()):
                continue
            starts.append((pos, cmd))
    starts.sort(reverse=True)
    for pos, cmd in starts[:_MAX_BOX_CANDIDATES]:
        i = pos + len(cmd)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text):
            continue
        if text[i] == "{":
            close = _match_brace(text, i, max_chars)
            if close < 0:
                if len(text) - i - 1 > max_chars:  # runs on past the cap: an over-long answer
                    return _TOO_LONG
                continue  # unclosed at the end of the text (a truncated generation): an earlier box
            content = text[i + 1 : close].strip()
            if len(content) > max_chars:
                return _TOO_LONG
            if content:
                return content
            continue
        if i > pos + len(cmd):  # "\boxed 5": the token after the space
            j = i
            while j < len(text) and j - i <= max_chars and text[j] not in " \t\n$":
                j += 1
            if j - i > max_chars:
                return _TOO_LONG
            token = text[i:j].strip().rstrip(".,;")
            if token:
                return token
    return None


def last_boxed(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox``/``\\framebox``) in ``text``.

    Nested braces are matched; an unclosed box at the end of the text (a truncated generation) is
    skipped in favour of an earlier complete one. ``\\boxed 5`` (no braces) yields ``"5"``.
    Returns ``None`` when there is no complete box, or when the last box holds more than
    ``max_chars`` characters (an over-long answer is no answer; an earlier box is not used).
    """
    if not isinstance(text, str):
        return None
    out = _last_box(text, max_chars)
    return None if out is _TOO_LONG else out


def strip_answer(ans: str) -> str:
    """Light clean-up of an extracted answer string (no evaluation): surrounding ``$``, a
    trailing full stop, ``\\(``/``\\)`` delimiters and whitespace."""
    s = ans.strip()
    for _ in range(3):
        before = s
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        s = s.strip("$").strip()
        if s.endswith(".") and not re.search(r"\d\.$", s[-2:]):
            s = s[:-1].rstrip()
        elif re.fullmatch(r"-?[\d,]*\d\.", s):  # "42." -> "42"
            s = s[:-1]
        if s == before:
            break
    return s


def _gsm8k_answer(text: str, max_chars: int) -> str | None:
    pos = text.rfind("####")
    if pos < 0:
        return None
    seg = text[pos + 4 : pos + 4 + max_chars + 64]  # the line, with room for surrounding spaces
    line = seg.split("\n", 1)[0]
    if "\n" not in seg and pos + 4 + len(seg) < len(text):  # the line runs on past the window
        return _TOO_LONG
    line = line.strip()
    if len(line) > max_chars:
        return _TOO_LONG
    if not line:
        return None
    # GSM8K writes plain numbers, sometimes with thousands separators or a currency sign
    line = line.replace("$", "").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", line):
        line = line.replace(",", "")
    return line or None


def _answer_is(text: str, max_chars: int) -> str | None:
    tail = text[-_TAIL_CHARS:]
    last = None
    for m in _ANSWER_IS_RE.finditer(tail):
        last = m
    if last is None:
        return None
    rest = tail[last.end() :].lstrip()
    if not rest:
        return None
    # the answer runs to the end of the line, or to a sentence end outside math mode
    line = rest.split("\n", 1)[0]
    out = []
    in_math = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "$":
            in_math = not in_math
        elif not in_math and ch == "." and (i + 1 == len(line) or line[i + 1] in " \t"):
            # a full stop ends the sentence unless it is a decimal point
            if not (i > 0 and line[i - 1].isdigit() and i + 1 < len(line) and line[i + 1].isdigit()):
                break
        out.append(ch)
        i += 1
    ans = "".join(out).strip()
    if len(ans) > max_chars:
        return _TOO_LONG
    return ans or None


def _last_number(text: str, max_chars: int) -> str | None:
    tail = text[-_TAIL_CHARS:]
    last = None
    for m in _NUMBER_RE.finditer(tail):
        last = m
    if last is None:
        return None
    s = last.group(0).rstrip(",")
    cut = last.start() == 0 and len(text) > len(tail) and text[-len(tail) - 1] in "0123456789,.-"
    if len(s) > max_chars or cut:  # longer than the cap, or the number runs on before the window
        return None
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.split(",")[-1] if "," in s else s


def extract_answer(text: str, last_number_fallback: bool = True, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The final answer written in ``text`` (a model output or a gold solution), or ``None``.

    Tries, in order: the last complete ``\\boxed{}``/``\\fbox{}``/``\\framebox{}``; GSM8K's
    ``####``; "the answer is ..."; and, if ``last_number_fallback``, the last number near the end
    of the text. The result is cleaned with :func:`strip_answer` and is at most ``max_chars``
    long; a stated answer longer than that is no answer, and the fallback is then not tried.
    Never raises on any string; non-strings give ``None``.
    """
    if not isinstance(text, str) or not text:
        return None
    for finder in (_last_box, _gsm8k_answer, _answer_is):
        ans = finder(text, max_chars)
        if ans is _TOO_LONG:
            return None
        if ans is not None:
            ans = strip_answer(ans)
            if ans:
                return ans
    if last_number_fallback:
        return _last_number(text, max_chars)
    return None
