"""Real benchmark data (attributed fixtures): every gold solution / gold answer is judged
correct against its gold answer, perturbed answers are judged wrong."""

import os

import pytest

from creditlib.eval import BENCHMARKS, extract_answer, is_correct_batch, load_benchmark, reference_solution
from creditlib.eval.selfcheck import format_self_check, perturb, self_check

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "math")


@pytest.fixture(scope="module")
def benchmarks():
    return {name: load_benchmark(name, path=FIXTURES).to_list() for name in BENCHMARKS}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_gold_solutions_and_answers_are_correct(benchmarks, name):
    rows = benchmarks[name]
    sols = [(r, reference_solution(name, r)) for r in rows]
    sols = [(r, s) for r, s in sols if s is not None]
    if name in ("gsm8k", "math500", "aime24", "minerva_math"):
        assert len(sols) == len(rows)  # these publishers mark the final answer in the solution
    for exact in (True, False):  # also with math-verify alone deciding (no string shortcut)
        ok = is_correct_batch([s for _, s in sols], [r["answer"] for r, _ in sols], exact_match=exact,
                              last_number_fallback=False)
        bad = [(r["answer"], extract_answer(s)) for (r, s), o in zip(sols, ok) if not o]
        assert not bad, f"{name}: gold solutions judged wrong: {bad}"
        ok = is_correct_batch([f"The final answer is $\\boxed{{{r['answer']}}}$." for r in rows],
                              [r["answer"] for r in rows], exact_match=exact)
        bad = [r["answer"] for r, o in zip(rows, ok) if not o]
        assert not bad, f"{name}: gold answers judged wrong: {bad}"


# perturbations that leave the value unchanged: the unit exponent in "15\mbox{ cm}^2" (units are
# ignored by the checker). Everything else must be rejected.
_SAME_VALUE = {"15\\mbox{ cm}^2", "864 \\mbox{ inches}^2"}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_perturbed_answers_are_wrong(benchmarks, name):
    rows = [r for r in benchmarks[name] if r["answer"] not in _SAME_VALUE]
    pert = [(r["answer"], perturb(r["answer"])) for r in rows]
    pert = [(g, p) for g, p in pert if p is not None]
    assert len(pert) >= 0.9 * len(rows)
    ok = is_correct_batch([f"\\boxed{{{p}}}" for _, p in pert], [g for g, _ in pert])
    accepted = [(g, p) for (g, p), o in zip(pert, ok) if o]
    assert not accepted, f"{name}: perturbed answers judged correct: {accepted}"
    # and a different benchmark row's answer is wrong too (when the values differ as strings)
    shifted = [r["answer"] for r in rows[1:]] + [rows[0]["answer"]]
    pairs = [(s, r["answer"]) for s, r in zip(shifted, rows) if s.replace(" ", "") != r["answer"].replace(" ", "")]
    ok = is_correct_batch([f"\\boxed{{{s}}}" for s, _ in pairs], [g for _, g in pairs])
    assert sum(ok) <= 0.02 * len(pairs) + 1, [p for p, o in zip(pairs, ok) if o]


def test_self_check_on_fixtures():
    results = self_check(FIXTURES, benchmarks=["math500", "amc23"])
    table = format_self_check(results)
    assert "math500" in table and "amc23" in table
    m500, amc = results
    assert m500.solution_checked == m500.rows == 50 and m500.solution_correct == 50
    assert amc.solution_checked == 0 and amc.answer_correct == amc.rows == 40
    accepted = {f["answer"] for f in m500.failures if f["kind"] == "perturbed_accepted"}
    assert accepted <= _SAME_VALUE and len(accepted) == m500.perturbed_checked - m500.perturbed_rejected
    with pytest.raises(ValueError):
        self_check(FIXTURES, benchmarks=["nope"])


def test_self_check_progress_bar_counts_every_check(capsys):
    """``eval_math.py --self-check`` was silent for over a minute: it now shows a bar over every check."""
    quiet = self_check(FIXTURES, benchmarks=["amc23"])
    capsys.readouterr()
    loud = self_check(FIXTURES, benchmarks=["amc23"], progress=True)
    err = capsys.readouterr().err
    amc = loud[0]
    total = 2 * (amc.solution_checked + amc.answer_checked) + amc.perturbed_checked  # 2 x (0 + 40) + perturbed
    assert "self-check (1 files)" in err and f"{total}/{total}" in err
    # the same verdicts with and without the bar (it only splits the batches)
    assert [(r.answer_correct, r.perturbed_rejected, r.failures) for r in loud] == \
        [(r.answer_correct, r.perturbed_rejected, r.failures) for r in quiet]
