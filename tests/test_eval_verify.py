"""is_correct / VerifierPool: equivalences, wrong answers, adversarial text, threads, hard kill."""

import os
import signal
import threading

import pytest

from creditlib.eval import VerifierPool, is_correct, is_correct_batch
from creditlib.eval.verify import default_pool


@pytest.mark.parametrize(
    "output, gold",
    [
        ("so $\\boxed{\\frac{1}{2}}$", "0.5"),
        ("\\boxed{0.5}", "\\frac12"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("#### 1,234", "1234"),
        ("The answer is $x^2+2x+1$.", "(x+1)^2"),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{[-1, 2)}", "[-1,2)"),
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{4.5\\times 10^{33}}", "4.5e33"),
        ("\\boxed{\\text{Yes}}", "yes"),
        ("\\boxed{\\textbf{(073)}}", "073"),
        ("\\boxed{25}", "025"),
        ("\\boxed{27}", 27.0),
        ("\\boxed{\\$18.90}", "\\$18.90"),
        ("\\boxed{52}", "52_8"),
        ("\\boxed{(1,8,19), (2,7,13), (4,5,7)}", ["(1,8,19), (2,7,13), (4,5,7)"]),
    ],
)
def test_equivalent_answers_are_correct(output, gold):
    assert is_correct(output, gold) is True


@pytest.mark.parametrize(
    "output, gold",
    [
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{[-1, 2]}", "[-1,2)"),
        ("\\boxed{2.88e-20}", "2.88e-19"),  # tiny numbers: relative, not 6-decimal, comparison
        ("\\boxed{52_9}", "52_8"),  # another base
        ("\\boxed{\\frac{1}{3} E_{1}+\\frac{2}{3} E_{3}}", "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}"),
        ("\\boxed{x+1}", "x-1"),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}"),
        ("\\boxed{No}", "Yes"),
        ("no answer at all", "3"),
    ],
)
def test_wrong_answers_are_wrong(output, gold):
    assert is_correct(output, gold) is False


def _returns_within(fn, limit_s):
    """Run fn in a thread; the answer, or 'HUNG' if it had not returned after limit_s (a hang
    guard far above the time limit, not a performance assertion)."""
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("v", fn()), daemon=True)
    th.start()
    th.join(limit_s)
    return "HUNG" if th.is_alive() else box["v"]


@pytest.mark.parametrize(
    "output",
    [
        "x" * 1_000_000,
        "1" * 1_000_000,
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
        "\\boxed{10^{10^{10}}}",
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{(10^{10^{10}})!}",
        "\\boxed{" + "\\frac{1}{" * 400 + "2" + "}" * 400 + "}",
    ],
)
def test_adversarial_outputs_are_wrong_and_do_not_hang(output):
    assert _returns_within(lambda: is_correct(output, "1", timeout=1.0), 60) is False


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"The answer is __import__('os').system('touch {marker}')",
        f"\\boxed{{exec(\"open('{marker}','w')\")}}",
        f"#### eval(\"__import__('os').system('touch {marker}')\")",
    ]
    for p in payloads:
        assert is_correct(p, "0", timeout=1.0) is False
    assert not marker.exists()


def test_never_raises_on_bad_samples_and_validates_arguments():
    bad = [None, 3, b"\\boxed{1}", ["\\boxed{1}"], "", "\\boxed{", "\ud800\\boxed{1}"]
    assert is_correct_batch(bad, ["1"] * len(bad)) == [False] * 6 + [True]
    assert is_correct("\\boxed{1}", None) is False
    assert is_correct("\\boxed{1}", {"a": 1}) is False
    with pytest.raises(ValueError, match="timeout"):
        is_correct("\\boxed{1}", "1", timeout=0)
    with pytest.raises(ValueError, match="same length"):
        is_correct_batch(["a"], ["1", "2"])


def test_batches_and_threads_give_the_same_answers():
    outs = [f"\\boxed{{{i % 7}}}" for i in range(60)]
    golds = [str(i % 5) for i in range(60)]
    expected = [i % 7 == i % 5 for i in range(60)]
    assert is_correct_batch(outs, golds) == expected
    results = {}

    def work(t):
        results[t] = [is_correct(o, g) for o, g in zip(outs[t::4], golds[t::4])]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        assert results[t] == expected[t::4]


def test_hung_worker_is_killed_and_replaced():
    with VerifierPool(num_workers=1) as pool:
        assert pool.check([("1", "1")], timeout=5.0) == [True]
        (worker,) = list(pool._all)
        os.kill(worker.proc.pid, signal.SIGSTOP)  # a worker stuck beyond signals' reach
        assert pool.check([("1", "1")], timeout=0.5) == [False]
        assert pool.kills == 1
        assert worker.proc.poll() is not None  # the stuck process is gone
        # a fresh worker takes over
        assert pool.check([("2", "2"), ("3", "2")], timeout=30.0) == [True, False]


def test_interrupted_check_leaves_the_pool_consistent():
    """A caller's own alarm (as SafeReward uses) interrupting a check must not leave stale
    replies behind for the next call."""
    pool = default_pool()

    class Interrupt(BaseException):
        pass

    def handler(signum, frame):
        raise Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupt):
            pool.check([("9^{9^{9^{9}}}", "1")] * 4, timeout=3.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert pool.check([("2", "2"), ("3", "2"), ("\\frac{1}{2}", "0.5")], timeout=30.0) == [True, False, True]


def test_pool_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="max_memory_mb"):
        VerifierPool(num_workers=1, max_memory_mb=-1)
