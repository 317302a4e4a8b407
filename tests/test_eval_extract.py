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
    assert extract_answer("1" * 1_000_000) is None  # a 1 MB "number" is longer than the cap: no answer
    assert last_boxed("\\boxed{" + "2" * (MAX_ANSWER_CHARS + 5) + "}") is None


LONG = "x" * (MAX_ANSWER_CHARS + 1)


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + LONG + " 123}",  # the bypass: an over-long box judged by its last number
        "\\boxed{5} and finally \\boxed{" + LONG + " 5}",  # nor an earlier box when the last is over-long
        "\\boxed{" + LONG + " 123",  # unclosed, running past the cap
        "\\boxed " + "7" * (MAX_ANSWER_CHARS + 1),
        "#### " + LONG + " 123",
        "#### " + LONG + " 123\nmore",
        "The answer is " + LONG + " 123.",
        "So " + "9" * (MAX_ANSWER_CHARS + 1),  # the fallback's own number over the cap
        "a" * 10_000 + "9" * 3_999,  # a number cut by the fallback's window
    ],
)
def test_answer_cap_cannot_be_bypassed_through_the_fallback(text):
    assert extract_answer(text, last_number_fallback=True) is None
    assert extract_answer(text, last_number_fallback=False) is None


def test_answer_cap_boundary():
    at_cap = "y" * MAX_ANSWER_CHARS
    assert extract_answer("\\boxed{" + at_cap + "}") == at_cap
    assert extract_answer("#### " + "1" * MAX_ANSWER_CHARS) == "1" * MAX_ANSWER_CHARS
    assert extract_answer("x" * 5000 + " so 42") == "42"  # a long text with a short final number is fine
    assert extract_answer("\\boxed{3} and later \\boxed{4") == "3"  # truncated short box: the earlier one
    assert extract_answer("it is 12 but \\boxed{" + "z" * 50) == "12"  # truncated short box, no earlier: fallback
