"""The one sampling core (``creditlib.generation.generate_tokens``) and the rl <-> eval layering.

* ``eval`` never imports ``rl`` (checked on the source), and only ``creditlib/generation.py`` calls
  ``model.generate``; the core imports neither ``eval`` nor ``rl``; its old home
  ``creditlib.eval.generation`` still serves the moved names with a ``DeprecationWarning``;
* ``HFGenerator`` (evaluation) and ``HFRollout`` (training) both sample through ``generate_tokens``
  and give what a plain ``model.generate(num_return_sequences=n)`` call gives with the same seed;
* masks: True up to and including the first EOS, padding after it.
"""

import ast
from pathlib import Path

import pytest
import torch

from creditlib.eval.generation import HFGenerator
from creditlib.generation import completion_mask_from_eos, eos_token_ids, generate_tokens, left_pad
from creditlib.rl.model import tiny_qwen2
from creditlib.rl.rollout import HFRollout
from creditlib.rl.task import build_char_tokenizer

PKG = Path(__file__).resolve().parents[1] / "creditlib"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_eval_never_imports_rl():
    files = sorted((PKG / "eval").glob("*.py"))
    assert len(files) >= 8
    for f in files:
        for mod, names in _imports(f):
            assert not mod.startswith(("creditlib.rl", "..rl")) and not (mod == ".." and "rl" in names), \
                f"{f.name} imports {mod} {names}: eval is the lower layer"


def test_one_generate_call_in_the_library():
    callers = [f.relative_to(PKG).as_posix() for f in PKG.rglob("*.py")
               if ".generate(" in f.read_text() and "model.generate(" in f.read_text()]
    # Any other caller must be named here with its reason (a sampler that cannot go through generate_tokens).
    other_samplers = {"rl/tree.py": "the tree sampler: Gumbel-max branching with its own logits processor"}
    assert "generation.py" in callers and set(callers) - {"generation.py"} <= set(other_samplers), callers


def test_sampling_core_is_neutral():
    for mod, names in _imports(PKG / "generation.py"):
        assert not mod.startswith(("creditlib.rl", "creditlib.eval", ".rl", ".eval")), mod


@pytest.mark.parametrize("name", ["generate_tokens", "left_pad", "completion_mask_from_eos", "eos_token_ids",
                                  "TokenGeneration", "VLLMEngine"])
def test_old_import_path_warns_and_gives_the_same_object(name):
    import creditlib.eval.generation as old
    import creditlib.generation as new

    with pytest.warns(DeprecationWarning, match=f"creditlib.generation.{name}"):
        obj = getattr(old, name)
    assert obj is getattr(new, name)
    with pytest.warns(DeprecationWarning):
        exec(f"from creditlib.eval.generation import {name}", {})
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_pad_token_falls_back_to_eos():
    from creditlib.generation import pad_token_id

    class Tok:
        pad_token_id, eos_token_id = None, 7

    assert pad_token_id(Tok()) == 7
    Tok.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        pad_token_id(Tok())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = tiny_qwen2(len(tok), 32, 1, 2, 64)
    model.eval()
    return model, tok


def test_generate_tokens_shapes_masks_and_greedy(tiny):
    model, tok = tiny
    ids, mask = left_pad([tok("1+-+?")["input_ids"], tok("2-?")["input_ids"]], tok.pad_token_id)  # [2, P]
    g = generate_tokens(model, tok, ids, mask, 3, max_new_tokens=7, temperature=1.0)
    B = 2 * 3
    assert g.prompt_ids.shape == (B, ids.shape[1]) and torch.equal(g.prompt_ids[3], ids[1])
    assert g.completion_ids.shape[0] == B and g.completion_ids.shape[1] <= 7 and len(g.texts) == B
    assert g.completion_mask.dtype == torch.bool
    eos = eos_token_ids(tok, model)
    ref = completion_mask_from_eos(g.completion_ids, eos)  # positions up to the first EOS
    assert torch.equal(g.completion_mask, ref)
    assert (g.completion_ids[~g.completion_mask] == tok.pad_token_id).all()
    assert g.texts == tok.batch_decode(g.completion_ids, skip_special_tokens=True)
    greedy = generate_tokens(model, tok, ids, mask, 2, max_new_tokens=5, greedy=True)
    assert torch.equal(greedy.completion_ids[0], greedy.completion_ids[1])
    assert model.training is False  # restored
    model.train()
    generate_tokens(model, tok, ids, mask, 1, max_new_tokens=2, greedy=True)
    assert model.training is True
    model.eval()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must"):
            generate_tokens(model, tok, ids, mask, bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, tok, ids, mask, 1, max_new_tokens=0)


def _plain_generate(model, tok, prompts, n, seed, max_new_tokens, temperature):
    """What HFGenerator did before it shared the core: one generate call with num_return_sequences."""
    enc = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(enc, tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos_token_ids(tok, model))  # [K*n, P+T]
    comp = out[:, ids.shape[1]:]  # [K*n, T]
    m = completion_mask_from_eos(comp, eos_token_ids(tok, model))
    texts = tok.batch_decode(torch.where(m, comp, tok.pad_token_id), skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def test_evaluation_and_training_sample_alike(tiny):
    model, tok = tiny
    prompts = ["1+-+?", "2-?", "7+++-?"]
    gen = HFGenerator(model, tok, temperature=0.9, top_p=1.0, max_new_tokens=6, batch_size=8, seed=11)
    got = gen.generate(prompts, 3)
    assert got == _plain_generate(model, tok, prompts, 3, 11, 6, 0.9)
    # the training rollout on the same token ids and RNG state gives the same completions
    ro = HFRollout(model, tok, max_new_tokens=6, temperature=0.9)
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    torch.manual_seed(11)
    batch = ro.rollout(ids, mask, 3)
    assert [batch.texts[i * 3:(i + 1) * 3] for i in range(3)] == got
    assert batch.group_size == 3 and batch.completion_mask.shape == batch.completion_ids.shape
