"""The documentation's Python code blocks run as written (CPU, offline).

Every fenced ```python block of ``docs/*.md`` and of ``README.md`` is executed. The blocks of one page run in order in
one fresh Python process (a later block may use what an earlier one defined), in an empty
temporary directory (files a page writes, e.g. ``output_dir="tiny-credit"``, land there), with the
repository on ``PYTHONPATH``, one thread and the Hugging Face Hub offline.

Convention: an HTML comment on the line right before a block (invisible when rendered) changes
how it is tested:

* ``<!-- skip-test: REASON -->``: the block is not run. Only for blocks that truly cannot run here
  (a GPU, the Hub, a benchmark of minutes, a fragment whose names come from the reader's own
  code); the reason is required and shows in the skip message.
* ``<!-- requires: verl -->`` (comma-separated module names): the block runs only where every
  module imports (e.g. the verl page in a verl environment), otherwise it is skipped like above.

Tracebacks name the page and the line of the block (``docs/trl.md:42``).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip-test|requires)\s*:?\s*(?P<arg>.*?)\s*-->\s*$")
TIMEOUT_S = 300


def parse_blocks(text: str):
    """``[(line, code, marker_kind, marker_arg)]`` of the ```python blocks of a Markdown text.

    ``line`` is the 1-based line of the first code line; ``marker_kind`` is ``None``,
    ``"skip-test"`` or ``"requires"`` (from the line right before the opening fence).
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        lang, indent = m.group("lang"), m.group("indent")
        j = i + 1
        while j < len(lines) and not (FENCE.match(lines[j]) and not FENCE.match(lines[j]).group("lang")):
            j += 1
        if j >= len(lines):
            raise ValueError(f"unclosed code fence opened at line {i + 1}")
        if lang == "python":
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
            kind = arg = None
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mk = MARKER.match(lines[k]) if k >= 0 else None
            if mk:
                kind, arg = mk.group("kind"), mk.group("arg")
            blocks.append((i + 2, textwrap.dedent("\n".join(body)) + "\n", kind, arg))
        i = j + 1
    return blocks


_DRIVER = r"""
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__main__"}
for name, code in blocks:
    print(f"--- running {name}", flush=True)
    try:
        exec(compile(code, name, "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"--- FAILED {name}", flush=True)
        sys.exit(1)
"""


def _pages():
    """Every page of docs/ plus the README (``"README.md"`` is read from the repository root)."""
    return sorted(p.name for p in DOCS.glob("*.md")) + ["README.md"]


def _path(page: str) -> Path:
    return ROOT / page if page == "README.md" else DOCS / page


def _missing(modules: str):
    names = [m.strip() for m in modules.split(",") if m.strip()]
    return [m for m in names if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("page", _pages())
def test_page_code_blocks_run(page, tmp_path):
    path = _path(page)
    blocks = parse_blocks(path.read_text(encoding="utf-8"))
    run, skipped = [], []
    for line, code, kind, arg in blocks:
        where = f"{path.relative_to(ROOT)}:{line}"
        if kind == "skip-test":
            assert arg, f"{where}: a skip-test marker needs a reason: <!-- skip-test: REASON -->"
            skipped.append(f"{where} ({arg})")
        elif kind == "requires" and _missing(arg):
            skipped.append(f"{where} (needs {', '.join(_missing(arg))})")
        else:
            run.append((where, code))
    if not run:
        pytest.skip("no runnable python block" + (": skipped " + "; ".join(skipped) if skipped else ""))
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(run), text=True, capture_output=True,
                          cwd=tmp_path, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"a code block of {path.relative_to(ROOT)} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    assert proc.stdout.count("--- running") == len(run)


# ----------------------------------------------------------------------------- the parser itself
def test_parse_blocks_markers_and_indentation():
    text = textwrap.dedent("""\
        # Title

        ```python
        a = 1
        ```

        <!-- skip-test: needs a GPU -->
        ```python
        b = 2
        ```

        1. item

           <!-- requires: verl, ray -->
           ```python
           if True:
               c = 3
           ```

        ```bash
        echo not python
        ```
        """)
    blocks = parse_blocks(text)
    assert [(ln, kind, arg) for ln, _, kind, arg in blocks] == [
        (4, None, None), (9, "skip-test", "needs a GPU"), (16, "requires", "verl, ray")]
    assert blocks[2][1] == "if True:\n    c = 3\n"
    exec(blocks[2][1], {})  # dedented: valid Python


def test_parse_blocks_rejects_unclosed_fence():
    with pytest.raises(ValueError, match="unclosed code fence opened at line 2"):
        parse_blocks("x\n```python\nprint(1)\n")


def test_every_skip_marker_has_a_reason():
    for page in _pages():
        for line, _, kind, arg in parse_blocks(_path(page).read_text(encoding="utf-8")):
            if kind == "skip-test":
                assert arg, f"{_path(page).relative_to(ROOT)}:{line}: <!-- skip-test: REASON --> needs a reason"


# ----------------------------------------------------------------------------- the figure of docs/credit.md
def test_demo_credit_figure_and_the_claims_of_credit_md(tmp_path, capsys):
    """recipes/demo_credit.py draws docs/img/credit_methods.png; the page's statements about it hold."""
    pytest.importorskip("matplotlib")
    import torch

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import demo_credit
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    from creditlib import functional as F

    path = demo_credit.main(["--out", str(tmp_path)])
    assert Path(path).stat().st_size > 10_000
    tokens, mask, rewards = demo_credit.sample_group()
    G = tokens.shape[0]
    c = {n: demo_credit.credit(n, tokens, mask, rewards) for n in demo_credit.METHODS}  # each [G, T]
    # grpo-lambda-norm: every row sums to the clamped GRPO row sum; grpo-lambda amplifies early tokens
    torch.testing.assert_close(c["grpo-lambda-norm"].sum(-1), c["clamp"].sum(-1), rtol=1e-5, atol=1e-5)
    assert c["grpo-lambda"][0, 0] > 10 * c["grpo"][0, 0] > 0
    # gspo = grpo at ratio 1
    torch.testing.assert_close(c["gspo"], c["grpo"])
    # prefix-gae: first token = RLOO advantage; pushes on the all-shared first token sum to zero;
    # o3 and o4 (both wrong, together after position 3) get nothing there
    rloo = F.group_advantage(rewards, G, baseline="loo")  # [G]
    torch.testing.assert_close(c["prefix-gae"][:, 0], rloo, rtol=1e-5, atol=1e-6)
    assert abs(float(c["prefix-gae"][:, 0].sum())) < 1e-5
    assert bool((c["prefix-gae"][3:5, 4:] == 0).all())
    # entropy-80-20 keeps about 20 % of the tokens
    kept = (c["entropy-80-20"] != 0).sum().item()
    assert 0 < kept <= 0.2 * mask.sum().item() + 1
