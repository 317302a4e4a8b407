"""The documentation's Python code blocks run as written, each on its own (CPU, offline).

Every fenced ```python block of ``docs/*.md`` and of ``README.md`` is executed **in a fresh
namespace**, so a block that uses a name it does not define or import fails with ``NameError``,
as it would for a reader who copies that one block. The blocks of one page run in page order in
one Python process (importing torch once per page), in one empty temporary directory (files a
page writes, e.g. ``output_dir="tiny-credit"`` or a tiny model saved by its first block, land
there and stay for the page's later blocks), with the repository on ``PYTHONPATH``, one thread and
the Hugging Face Hub offline.

Convention: HTML comments on the lines right before a block (invisible when rendered) change how
it is tested; several may be stacked, one per line:

* ``<!-- skip-test: REASON -->``: the block is not run. Only for blocks that truly cannot run here
  (a GPU, the Hub, a benchmark of minutes, a fragment whose names come from the reader's own
  code); the reason is required and shows in the skip message.
* ``<!-- requires: verl -->`` (comma-separated module names): the block runs only where every
  module imports (e.g. the verl page in a verl environment), otherwise it is skipped like above.
* ``<!-- continues -->``: the block continues the python block before it: it runs in that block's
  namespace (and so in the namespace of the whole chain that block continues), after it. The
  rendered page must say so too: the prose between the two blocks has to contain a word starting
  with "continu" ("This block continues the one above", "Continuing the example:"), which
  ``test_every_continuation_is_announced`` checks. When a block is skipped, the blocks that
  continue it are skipped with it.

Tracebacks name the page and the line of the block (``docs/trl.md:42``).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip-test|requires|continues)\s*:?\s*(?P<arg>.*?)\s*-->\s*$")
COMMENT = re.compile(r"<!--.*?-->", re.S)
ANNOUNCED = re.compile(r"(?i)\bcontinu")
TIMEOUT_S = 300


@dataclass
class Block:
    """One ```python block: ``line`` is the 1-based line of its first code line; ``markers`` maps each
    marker kind found right before the fence (``"skip-test"``, ``"requires"``, ``"continues"``) to its
    argument; ``prose`` is the visible text (HTML comments removed) between the previous fenced block
    of any language (or the top of the page) and this one."""

    line: int
    code: str
    markers: dict = field(default_factory=dict)
    prose: str = ""


def parse_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in page order (see the module docstring)."""
    lines = text.splitlines()
    blocks, i, prev_end = [], 0, 0  # prev_end: the line after the previous fence's closing line
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
            markers, k = {}, i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            while k >= prev_end and MARKER.match(lines[k]):
                mk = MARKER.match(lines[k])
                if mk.group("kind") in markers:
                    raise ValueError(f"line {k + 1}: a second <!-- {mk.group('kind')} --> marker for one block")
                markers[mk.group("kind")] = mk.group("arg")
                k -= 1
            prose = COMMENT.sub("", "\n".join(lines[prev_end:i])).strip()
            blocks.append(Block(i + 2, textwrap.dedent("\n".join(body)) + "\n", markers, prose))
        prev_end = j + 1
        i = j + 1
    return blocks


def chains(blocks: list[Block]) -> list[list[Block]]:
    """Group blocks into chains that share one namespace: a block without ``continues`` starts a
    chain, each ``continues`` block joins the chain of the block before it."""
    out = []
    for b in blocks:
        if "continues" in b.markers:
            if not out:
                raise ValueError(f"line {b.line}: <!-- continues --> on the first python block of the page")
            out[-1].append(b)
        else:
            out.append([b])
    return out


_DRIVER = r"""
import json, os, sys, traceback
chains = json.loads(sys.stdin.read())
for chain in chains:
    ns = {"__name__": "__main__"}      # a fresh namespace per chain: a standalone block sees no earlier names
    for name, code in chain:
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


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:  # a page outside the repository (the runner's own test)
        return path.name


def _missing(modules: str):
    names = [m.strip() for m in modules.split(",") if m.strip()]
    return [m for m in names if importlib.util.find_spec(m) is None]


def _skip_reason(block: Block):
    """Why ``block`` is not run here (``None``: it runs)."""
    if "skip-test" in block.markers:
        return block.markers["skip-test"]
    if "requires" in block.markers and _missing(block.markers["requires"]):
        return "needs " + ", ".join(_missing(block.markers["requires"]))
    return None


def plan_page(page: str):
    """``(run, skipped)``: the chains to run, as ``[[(where, code), ...], ...]``, and the skipped blocks
    as ``"where (reason)"``. A chain is cut where a block is skipped: its continuations go with it."""
    path = _path(page)
    run, skipped = [], []
    for chain in chains(parse_blocks(path.read_text(encoding="utf-8"))):
        todo, cut = [], None
        for b in chain:
            where = f"{_rel(path)}:{b.line}"
            reason = cut or _skip_reason(b)
            if reason is not None:
                cut = cut or f"continues a skipped block: {reason}"
                skipped.append(f"{where} ({reason})")
            else:
                todo.append((where, b.code))
        if todo:
            run.append(todo)
    return run, skipped


@pytest.mark.slow  # one Python process per page (some pages train a tiny model for a few steps)
@pytest.mark.parametrize("page", _pages())
def test_page_code_blocks_run(page, tmp_path):
    run, skipped = plan_page(page)
    if not run:
        pytest.skip("no runnable python block" + (": skipped " + "; ".join(skipped) if skipped else ""))
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(run), text=True, capture_output=True,
                          cwd=tmp_path, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"a code block of {_rel(_path(page))} failed (each block runs in a "
                                  f"fresh namespace unless marked <!-- continues -->):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    assert proc.stdout.count("--- running") == sum(len(c) for c in run)


# ----------------------------------------------------------------------------- the page conventions
def test_every_skip_marker_has_a_reason():
    for page in _pages():
        for b in parse_blocks(_path(page).read_text(encoding="utf-8")):
            if "skip-test" in b.markers:
                assert b.markers["skip-test"], (f"{_rel(_path(page))}:{b.line}: "
                                                "<!-- skip-test: REASON --> needs a reason")


def test_every_continuation_is_announced():
    """A block that continues the previous one says so in the rendered page, not only in the comment."""
    for page in _pages():
        blocks = parse_blocks(_path(page).read_text(encoding="utf-8"))
        chains(blocks)  # raises on a continuation without a block before it
        for b in blocks:
            if "continues" in b.markers:
                assert ANNOUNCED.search(b.prose), (
                    f"{_rel(_path(page))}:{b.line}: a <!-- continues --> block needs a visible sentence "
                    f"above it saying that it continues the previous block (e.g. 'This block continues the one "
                    f"above.'); the text between the two blocks is: {b.prose!r}")


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

        Continuing the example above:

        <!-- requires: verl -->
        <!-- continues -->
        ```python
        d = c
        ```
        """)
    blocks = parse_blocks(text)
    assert [(b.line, b.markers) for b in blocks] == [
        (4, {}), (9, {"skip-test": "needs a GPU"}), (16, {"requires": "verl, ray"}),
        (29, {"requires": "verl", "continues": ""})]
    assert blocks[2].code == "if True:\n    c = 3\n"
    exec(blocks[2].code, {})  # dedented: valid Python
    assert blocks[3].prose == "Continuing the example above:"  # from the bash block's end; comments removed
    assert blocks[0].prose == "# Title"
    assert [[b.line for b in c] for c in chains(blocks)] == [[4], [9], [16, 29]]


def test_parse_blocks_rejects_unclosed_fence_and_misplaced_markers():
    with pytest.raises(ValueError, match="unclosed code fence opened at line 2"):
        parse_blocks("x\n```python\nprint(1)\n")
    with pytest.raises(ValueError, match="second <!-- skip-test --> marker"):
        parse_blocks("<!-- skip-test: a -->\n<!-- skip-test: b -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="continues --> on the first python block"):
        chains(parse_blocks("Continued:\n<!-- continues -->\n```python\npass\n```\n"))


def test_fresh_namespace_per_block_and_shared_one_per_chain(tmp_path, monkeypatch, capsys):
    """The runner fails a standalone block that uses an earlier block's name, runs a marked continuation
    in its chain's namespace, and skips the continuations of a skipped block (driver run in-process)."""
    import io

    page = tmp_path / "page.md"
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    monkeypatch.chdir(tmp_path)

    def run(text):
        page.write_text(text, encoding="utf-8")
        chains_, skipped = plan_page("page.md")
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(chains_)))
        code = 0
        try:
            exec(_DRIVER, {})
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err, skipped

    standalone = "```python\nx = 1\n```\n\nThen:\n\n```python\nprint(x + 1)\n```\n"
    code, out, err, _ = run(standalone)
    assert code == 1 and "NameError: name 'x' is not defined" in err and "--- FAILED page.md:8" in out
    code, out, err, _ = run(standalone.replace("Then:\n\n", "This continues the block above:\n\n<!-- continues -->\n"))
    assert code == 0 and out.count("--- running") == 2 and "2\n" in out, err
    code, out, err, skipped = run("<!-- skip-test: demo -->\n"
                                  + standalone.replace("Then:\n\n", "Continued:\n<!-- continues -->\n"))
    assert code == 0 and "--- running" not in out
    assert skipped == ["page.md:3 (demo)", "page.md:9 (continues a skipped block: demo)"]


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


# ----------------------------------------------------------------------------- the figure of docs/agents.md
def test_demo_agents_figure_and_the_claims_of_agents_md(tmp_path, capsys):
    """recipes/demo_agents.py draws docs/img/agents_credit.png; the page's statements about it hold."""
    pytest.importorskip("matplotlib")
    import torch

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import demo_agents
    finally:
        sys.path.remove(str(ROOT / "recipes"))

    path = demo_agents.main(["--out", str(tmp_path)])
    assert Path(path).stat().st_size > 10_000
    tokens, turn_ids, turn_rewards, state_ids, rewards, positions = demo_agents.group()
    assert rewards.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and [p[-1] for p in positions][:3] == [3, 3, 3]
    c = {n: demo_agents.credit(n, tokens, turn_ids, turn_rewards, state_ids, rewards) for n in demo_agents.METHODS}
    lens = [len(e) for e in demo_agents.EPISODES]
    valid = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]  # [G, K]
    # turn-grpo: one value per episode (+1.10 / -1.10 here)
    g = c["turn-grpo"]
    assert all(len(set(round(v, 6) for v in g[i, :n].tolist())) == 1 for i, n in enumerate(lens))
    assert abs(float(g[0, 0]) - 1.10) < 0.01 and abs(float(g[3, 0]) + 1.10) < 0.01
    # turn-index = turn-grpo while every episode is still running (turns 0-3), different at turns 4-5
    torch.testing.assert_close(c["turn-index"][:, :4], g[:, :4])
    assert not torch.allclose(c["turn-index"][1:, 4:], g[1:, 4:])
    # anchor-state: larger in size than the episode term alone
    assert float(c["anchor-state"][valid].abs().mean()) > float(g[valid].abs().mean())
    # prefix-turn: the first turn (every episode starts at the root) = turn-grpo; ---- and --+--- share --
    torch.testing.assert_close(c["prefix-turn"][:, 0], g[:, 0])
    # the detour + of +----- (an episode that succeeded) gets positive credit from every method
    assert all(float(c[n][1, 0]) > 0 for n in demo_agents.METHODS)
    # with the process score, undiscounted returns reward length (the detour episode collects more scores);
    # discounted (turn_gamma 0.5), the move's own score dominates and the detour turns negative
    grp = demo_agents.group(1.0)[:5]
    for n in ("turn-index", "anchor-state"):
        assert float(demo_agents.credit(n, *grp)[1, 0]) > float(demo_agents.credit(n, *grp)[0, 0]) > 0
        assert float(demo_agents.credit(n, *grp, turn_gamma=0.5)[1, 0]) < 0
