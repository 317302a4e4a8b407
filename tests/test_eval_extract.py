"""Final-answer extraction: boxed with nested braces, fbox/framebox, ####, "the answer is"."""

import pytest

from creditlib.eval.extract import MAX_ANSWER_CHARS, extract_answer, last_boxed, strip_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
        ("\\boxed{a^{b^{c}}}", "a^{b^{c}}"),
        ("\\fbox{7} ok", "7"),
        ("$\\framebox{204}$ minutes", "204"),
        ("\\boxed 5$", "5"),
        ("\\boxed{3} and later \\boxed{4", "3"),  # truncated last box: the previous complete one
        ("\\boxed{}", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("#### $42", "42"),
        ("Thus the answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The final answer is: 2.5. I hope it is correct.", "2.5"),
        ("...so the answer is 12\nmore text", "12"),
        ("There are 3 apples and 12 pears.", "12"),  # last-number fallback
        ("#### 7 but \\boxed{8}", "8"),  # boxed wins
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_without_fallback_and_bad_input():
    assert extract_answer("There are 3 apples.", last_number_fallback=False) is None
    assert extract_answer("There are no numbers") is None
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(123) is None  # type: ignore[arg-type]
    assert extract_answer("") is None


def test_strip_answer():
    assert strip_answer(" $\\frac12$. ") == "\\frac12"
    assert strip_answer("42.") == "42"
    assert strip_answer("\\(x+1\\)") == "x+1"
    assert strip_answer("3.5") == "3.5"


def test_long_and_nested_inputs_are_bounded():
    # 10k nested braces: longer than MAX_ANSWER_CHARS, so no answer (and no deep recursion)
    deep = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert last_boxed(deep) is None
    # nesting within the limit is matched
    ok = "\\boxed{" + "{" * 100 + "1" + "}" * 100 + "}"
    assert last_boxed(ok) == "{" * 100 + "1" + "}" * 100
    # 1 MB of unclosed boxes and braces, and 1 MB of digits: linear scans, no pathological regex
    many = "\\boxed{" * 150_000
    assert last_boxed(many) is None
    assert extract_answer("x" * 1_000_000) is None
    out = extract_answer("1" * 1_000_000)
    assert out is not None and set(out) == {"1"}
    assert last_boxed("\\boxed{" + "2" * (MAX_ANSWER_CHARS + 5) + "}") is None
