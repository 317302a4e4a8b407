"""Environments (creditlib.rl.env / creditlib.rl.envs): protocol guard, registry, the two bundled
environments, the dial-walk's process reward, their problem sources and demonstrations."""

import random
import time

import pytest

pytest.importorskip("transformers")

from creditlib.rl.data import Example  # noqa: E402
from creditlib.rl.env import (EnvFailure, Reset, SafeEnv, Step, get_env, list_envs, register_env,  # noqa: E402
                              stable_state_id)
from creditlib.rl.envs import (CalculatorEnv, CalculatorSource, DialWalkEnv, DialWalkScorer, EnvExample,  # noqa: E402
                               DialWalkSource, dial_distance, evaluate_expression, parse_dial_prompt)
from creditlib.rl.task import CHAR_VOCAB, build_char_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _dial(s, g):
    return Example(f"{g}?{s}", str(g))


# ----------------------------------------------------------------------------- state ids
def test_stable_state_id_is_stable_and_distinguishes_states():
    a = stable_state_id("dial-walk", 3, 7)
    assert a == stable_state_id("dial-walk", 3, 7) and 0 <= a < 2 ** 63
    # pinned: ids must be the same in every process and release (GiGPO groups turns across workers by them)
    assert a == 2115152358734946701
    ids = {stable_state_id("dial-walk", p, g) for p in range(10) for g in range(10)}
    assert len(ids) == 100
    assert stable_state_id("calculator", "1+2?", ()) != stable_state_id("calculator", "1+2?", ("3",))
    assert stable_state_id("a", "1") != stable_state_id("a", 1)  # repr keeps types apart


# ----------------------------------------------------------------------------- the guard
class _Raising:
    def reset(self, example):
        return Reset("", 0)

    def step(self, action):
        raise KeyError("boom")


class _Hanging:
    def reset(self, example):
        return Reset("", 0)

    def step(self, action):
        time.sleep(30)
        return Step("", 0.0, True, 0)


class _Returns:
    def __init__(self, out):
        self.out = out

    def reset(self, example):
        return Reset("", 0)

    def step(self, action):
        return self.out


def test_safe_env_turns_errors_hangs_and_bad_values_into_env_failure():
    ex = Example("1?2", "1")
    env = SafeEnv(_Raising, timeout=1.0)
    assert env.reset(ex) == Reset("", 0)
    with pytest.raises(EnvFailure, match="env.step raised KeyError: 'boom'"):
        env.step("+")
    env = SafeEnv(_Hanging, timeout=0.2)
    env.reset(ex)
    t0 = time.monotonic()
    with pytest.raises(EnvFailure, match="timed out after 0.2 s"):
        env.step("+")
    assert time.monotonic() - t0 < 10  # the sleep was interrupted, not waited out
    bad = [(Step(3, 0.0, False, 0), "observation"), (Step("", float("nan"), False, 0), "finite"),
           (Step("", "x", False, 0), "finite"), (Step("", 0.0, False, -2), "state_id"),
           (Step("", 0.0, False, 1.5), "state_id"), (Step("", 0.0, False, True), "state_id"),
           ("not a step", "expected Step")]
    for out, msg in bad:
        env = SafeEnv(lambda o=out: _Returns(o), timeout=1.0)
        env.reset(ex)
        with pytest.raises(EnvFailure, match=msg):
            env.step("+")
    env = SafeEnv(lambda: _Returns(("obs", 1, 0, 5)), timeout=1.0)  # a plain 4-tuple is read as a Step
    env.reset(ex)
    assert env.step("+") == Step("obs", 1.0, False, 5)

    def broken_factory():
        raise RuntimeError("no env today")

    with pytest.raises(EnvFailure, match="make_env\\(\\) raised RuntimeError: no env today"):
        SafeEnv(broken_factory).reset(ex)
    with pytest.raises(EnvFailure, match="no reset/step"):
        SafeEnv(lambda: object()).reset(ex)
    with pytest.raises(EnvFailure, match="env.reset raised ValueError"):
        SafeEnv(DialWalkEnv).reset(Example("nonsense", "1"))
    with pytest.raises(ValueError, match="timeout"):
        SafeEnv(DialWalkEnv, timeout=0)
    with pytest.raises(ValueError, match="make_env"):
        SafeEnv("dial-walk")


def test_safe_env_checks_process_scores():
    env = SafeEnv(DialWalkEnv)
    env.reset(_dial(1, 3))

    class Short:
        def score(self, example, actions, observations):
            return [1.0]

    class NaN:
        def score(self, example, actions, observations):
            return [float("nan")] * len(actions)

    assert env.score(DialWalkScorer(), _dial(1, 3), ["+", "+"], ["3?2", "3?3"]) == [1.0, 1.0]
    with pytest.raises(EnvFailure, match="1 scores for 2 turns"):
        env.score(Short(), _dial(1, 3), ["+", "+"], ["3?2", "3?3"])
    with pytest.raises(EnvFailure, match="non-finite"):
        env.score(NaN(), _dial(1, 3), ["+"], ["3?2"])


# ----------------------------------------------------------------------------- registry
def test_registry_names_lookup_and_errors():
    assert list_envs()[:2] == ["dial-walk", "calculator"]
    spec = get_env("Dial_Walk")
    assert spec.name == "dial-walk" and spec.make_env is DialWalkEnv and isinstance(spec.process_reward, DialWalkScorer)
    assert spec.embedded and get_env(" calculator ").process_reward is None
    with pytest.raises(ValueError, match="did you mean 'dial-walk'"):
        get_env("dial-wlak")
    with pytest.raises(ValueError, match="unknown environment 'zzz'; registered"):
        get_env("zzz")
    with pytest.raises(ValueError, match="already registered"):
        register_env("Dial_Walk", DialWalkEnv, source=lambda cfg, tok: None, description="again")
    with pytest.raises(ValueError, match="make_env must be callable"):
        register_env("x-env", 3, source=lambda cfg, tok: None, description="d")
    with pytest.raises(ValueError, match="source must be callable"):
        register_env("x-env", DialWalkEnv, source=None, description="d")
    with pytest.raises(ValueError, match="description"):
        register_env("x-env", DialWalkEnv, source=lambda cfg, tok: None, description=" ")
    with pytest.raises(ValueError, match="score"):
        register_env("x-env", DialWalkEnv, source=lambda cfg, tok: None, description="d", process_reward=object())
    with pytest.raises(ValueError, match="spaces"):
        register_env("x env", DialWalkEnv, source=lambda cfg, tok: None, description="d")
    assert "x-env" not in list_envs()
    spec = register_env("Test_Env_Registry", DialWalkEnv, source=lambda cfg, tok: "src", description="a test env")
    try:
        assert get_env("test-env-registry") is spec and spec.build_source(None, None) == "src"
        again = register_env("test-env-registry", DialWalkEnv, source=lambda cfg, tok: "other", description="b",
                             overwrite=True)
        assert get_env("test_env_registry") is again
    finally:
        from creditlib.rl import env as env_mod

        env_mod._ENVS.pop("test-env-registry", None)


def test_registered_sources_read_the_recipe_config(tok):
    from creditlib.rl.config import RecipeConfig

    cfg = RecipeConfig(data_seed=7, eval_size=16)
    dial = get_env("dial-walk").build_source(cfg, tok)
    assert isinstance(dial, DialWalkSource) and dial.data_seed == 7
    assert dial.heldout_pairs() != DialWalkSource(tok, data_seed=8).heldout_pairs()
    calc = get_env("calculator").build_source(cfg, tok)
    assert isinstance(calc, CalculatorSource) and len(calc.heldout(1000)) == 16
    assert get_env("dial-walk").build_source(None, tok).data_seed == 1234


# ----------------------------------------------------------------------------- dial-walk
def test_dial_walk_steps_rewards_cut_and_states():
    env = DialWalkEnv()
    r = env.reset(_dial(7, 3))  # 7 -> 3: 4 moves down; cut after 4 + 2
    assert r == Reset("", stable_state_id("dial-walk", 7, 3)) and env.max_turns == 6
    seen = []
    for a, pos in (("+", 8), ("-", 7), ("=", 7), ("", 7), ("-", 6)):
        st = env.step(a)
        assert st == Step(f"3?{pos}", 0.0, False, stable_state_id("dial-walk", pos, 3))  # target restated
        seen.append(st.state_id)
    assert seen[1] == seen[2] == seen[3] == r.state_id  # a revisit and invalid moves repeat the state
    st = env.step("-")
    assert st == Step("3?5", 0.0, True, stable_state_id("dial-walk", 5, 3))  # cut at 6 moves, not reached
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("-")
    env.reset(_dial(9, 1))  # wraps: 9 -> 0 -> 1
    assert env.step("+") == Step("1?0", 0.0, False, stable_state_id("dial-walk", 0, 1))
    assert env.step(" + ") == Step("1?1", 1.0, True, stable_state_id("dial-walk", 1, 1))
    env = DialWalkEnv(slack=0)
    env.reset(_dial(0, 5))
    assert env.max_turns == 5
    for bad in ("3?3", "3-7", "13?7", "a?b"):
        with pytest.raises(ValueError):
            DialWalkEnv().reset(Example(bad, "3"))
    with pytest.raises(ValueError, match="slack"):
        DialWalkEnv(slack=-1)
    assert parse_dial_prompt(" 3?7 ") == (3, 7)
    assert [dial_distance(0, b) for b in range(10)] == [0, 1, 2, 3, 4, 5, 4, 3, 2, 1]


def test_dial_walk_process_scorer_on_hand_made_moves():
    sc = DialWalkScorer()
    # target 3 from 7: 7 -(6) +(7) -(6) =(6) -(5) -(4) -(3)
    assert sc.score(_dial(7, 3), ["-", "+", "-", "=", "-", "-", "-"], [""] * 7) == [1, 0, 1, 0, 1, 1, 1]
    # wrapping: target 9 from 1 is 2 steps down (1 -> 0 -> 9); up is 8 steps
    assert sc.score(_dial(1, 9), ["-", "-"], ["9?0", "9?9"]) == [1.0, 1.0]
    assert sc.score(_dial(1, 9), ["+", "-", "-", "-"], [""] * 4) == [0.0, 1.0, 1.0, 1.0]
    # distance 5: both directions are right
    assert sc.score(_dial(5, 0), ["+"], [""]) == [1.0] and sc.score(_dial(5, 0), ["-"], [""]) == [1.0]
    assert sc.score(_dial(5, 0), ["+", "-"], ["", ""]) == [1.0, 0.0]
    assert sc.score(_dial(2, 4), ["++", "x", ""], [""] * 3) == [0.0, 0.0, 0.0]  # invalid moves never score
    assert sc.score(_dial(2, 4), [], []) == []
    # the scorer agrees with the env: a move scores 1 iff the distance the env reports shrank
    rng = random.Random(0)
    for _ in range(200):
        s, g = rng.sample(range(10), 2)
        env = DialWalkEnv(slack=3)
        env.reset(_dial(s, g))
        acts, pos, want = [], s, []
        while True:
            a = rng.choice(["+", "-", "="])
            st = env.step(a)
            acts.append(a)
            assert st.observation.startswith(f"{g}?")  # the target, restated
            new = int(st.observation[len(f"{g}?"):])
            want.append(1.0 if dial_distance(new, g) < dial_distance(pos, g) else 0.0)
            pos = new
            if st.done:
                break
        assert sc.score(_dial(s, g), acts, [""] * len(acts)) == want


def test_dial_walk_source_split_demonstrations_and_seeding(tok):
    src = DialWalkSource(tok)
    test, val = src.heldout_pairs("test"), src.heldout_pairs("val")
    assert len(test) == 20 and len(val) == 10 and len(src.train_pairs) == 60
    assert len(set(test) | set(val) | set(src.train_pairs)) == 90
    train, pos = src.next_batch(0, 3000)
    assert pos == 3000
    drawn = {parse_dial_prompt(e.prompt)[::-1] for e in train}
    assert drawn == set(src.train_pairs)  # the whole training set is drawn, and nothing else
    assert not drawn & (set(test) | set(val))
    held = src.heldout(100)
    assert [parse_dial_prompt(e.prompt)[::-1] for e in held] == test and len(src.validation(4)) == 4
    assert src.next_batch(5, 3)[0] == train[5:8]  # the stream is a function of the position
    assert DialWalkSource(tok, data_seed=1234).heldout_pairs() == test
    assert DialWalkSource(tok, data_seed=99).heldout_pairs() != test
    ties, detours = set(), 0
    for e in train + held + src.validation(10):
        g, s = parse_dial_prompt(e.prompt)
        assert e.answer == str(g) and set(e.prompt) <= set(CHAR_VOCAB)
        assert e.explore in (0, 1) and (e in train or e.explore == 0)  # held-out demonstrations: no detour
        p = s
        if e.explore:  # a detour: one move against the shortest way (not trained on), then the shortest path
            detours += 1
            p = (s + (1 if e.actions[0] == "+" else -1)) % 10
            assert dial_distance(p, g) == dial_distance(s, g) + 1 or dial_distance(s, g) == 5
            assert len(e.actions) == 1 + dial_distance(p, g) <= dial_distance(s, g) + 2  # within the slack
        rest = e.actions[e.explore:]
        assert len(rest) == dial_distance(p, g) and len(set(rest)) == 1  # the shortest path
        env = DialWalkEnv()
        env.reset(e)
        obs = [env.step(a) for a in e.actions]
        assert obs[-1].reward == 1.0 and obs[-1].done and not any(o.done for o in obs[:-1])
        pos = [s]
        for a in e.actions:
            pos.append((pos[-1] + (1 if a == "+" else -1)) % 10)
        assert [o.observation for o in obs] == [f"{g}?{q}" for q in pos[1:]]  # the target, then the position
        # the transcript: move, observation, ..., the last move (its answer is not shown)
        assert e.solution == "".join(a + o.observation for a, o in zip(e.actions[:-1], obs)) + e.actions[-1]
        if dial_distance(s, g) == 5 and not e.explore:
            ties.add(e.actions[0])
    assert 0.4 < detours / len(train) < 0.6  # detour = 0.5 of the training demonstrations
    assert all(e.explore == 0 for e in DialWalkSource(tok, detour=0.0).next_batch(0, 200)[0])
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="detour"):
            DialWalkSource(tok, detour=bad)
    with pytest.raises(ValueError, match="slack >= 2"):
        DialWalkSource(tok, slack=1)
    assert DialWalkSource(tok, slack=1, detour=0.0).max_turns == 6
    assert ties == {"+", "-"}  # ties go either way (seeded)
    with pytest.raises(ValueError, match="more than half"):
        DialWalkSource(tok, heldout_sizes={"test": 40, "val": 10})
    with pytest.raises(ValueError, match="split"):
        src.heldout_pairs("train")


def test_dial_walk_demonstrations_label_only_policy_tokens(tok):
    src = DialWalkSource(tok)
    exs = src.next_batch(0, 12)[0]
    assert {e.explore for e in exs} == {0, 1}  # both kinds in the batch
    ids, attn, labels = src.encode_sft(exs)  # [K, L] each
    assert ids.shape == attn.shape == labels.shape
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for i, e in enumerate(exs):
        n = int(attn[i].sum())
        assert bool(attn[i, :n].all()) and not bool(attn[i, n:].any()) and bool((ids[i, n:] == pad).all())
        row, lab = ids[i, :n].tolist(), labels[i, :n].tolist()
        # the expected transcript, replayed in a fresh env: prompt, then move+EOS, observation, ...;
        # a detour's first move is in the row but not labelled
        env = DialWalkEnv()
        env.reset(e)
        want, want_lab = tok(e.prompt)["input_ids"], None
        want_lab = [-100] * len(want)
        for k, a in enumerate(e.actions):
            toks = tok(a, add_special_tokens=False)["input_ids"] + [eos]
            want += toks
            want_lab += toks if k >= e.explore else [-100] * len(toks)
            st = env.step(a)
            if k < len(e.actions) - 1:
                o = tok(st.observation, add_special_tokens=False)["input_ids"]
                want += o
                want_lab += [-100] * len(o)
        assert row == want and lab == want_lab
        assert all(x == -100 for x in labels[i, n:].tolist())
        labelled = [t for t, l in zip(row, lab) if l != -100]
        assert tok.decode(labelled) == "<eos>".join(e.actions[e.explore:]) + "<eos>"
    with pytest.raises(ValueError, match="explore"):
        src._solution("3?7", "3", ["-"], explore=1)  # every move exploration: nothing to learn
    e = exs[0]
    with pytest.raises(ValueError, match="explore"):
        src.encode_sft([EnvExample(e.prompt, e.answer, e.solution, e.actions, len(e.actions))])


# ----------------------------------------------------------------------------- calculator
def test_calculator_env_calls_answers_bad_calls_and_cut():
    ex = Example("47+38-12?", "73")
    env = CalculatorEnv()
    r = env.reset(ex)
    assert r == Reset("", stable_state_id("calculator", "47+38-12?", ()))
    st = env.step("47+38=")
    assert st == Step("85", 0.0, False, stable_state_id("calculator", "47+38-12?", ("85",)))
    st = env.step("85-12=")
    assert st.observation == "73" and not st.done
    assert env.step("73") == Step("", 1.0, True, stable_state_id("calculator", "47+38-12?", ("85", "73")))
    env.reset(ex)
    assert env.step("72").reward == 0.0 and env.done
    env.reset(ex)  # bad calls answer "?" and count as turns; cut at max_turns
    for a in ("4++7=", "=", "+3=", "1234567890+1="):
        st = env.step(a)
        assert st.observation == "?" and st.reward == 0.0
    assert st.done and env.results == ("?",) * 4
    env = CalculatorEnv(max_turns=2)
    env.reset(Example("10-20-30?", "-40"))
    assert env.step("-10-30=").observation == "-40"
    assert env.step("-40") == Step("", 1.0, True, stable_state_id("calculator", "10-20-30?", ("-40",)))
    env.reset(Example("10-20-30?", "-40"))
    env.step("1=")
    assert env.step("2=").done  # two calls: cut without an answer
    assert evaluate_expression("-3+4-10") == -9 and evaluate_expression("3*4") is None
    assert evaluate_expression("") is None and evaluate_expression("1" * 10) is None
    with pytest.raises(ValueError, match="max_turns"):
        CalculatorEnv(max_turns=0)
    with pytest.raises(ValueError, match="end with"):
        CalculatorEnv().reset(Example("1+2", "3"))


def test_calculator_source_split_and_demonstrations(tok):
    src = CalculatorSource(tok, heldout_sizes={"test": 64, "val": 32})
    held = {e.prompt for e in src.heldout(1000)} | {e.prompt for e in src.validation(1000)}
    assert len(held) == 96
    train, _ = src.next_batch(0, 4000)
    assert not {e.prompt for e in train} & held
    assert src.next_batch(0, 4000)[0] == train  # seeded
    exs = train[:16]
    ids, attn, labels = src.encode_sft(exs)  # [K, L]
    for i, e in enumerate(exs):
        assert set(e.prompt) <= set(CHAR_VOCAB) and len(e.actions) == 3
        a, b = e.actions[0][:-1], e.actions[1][:-1]
        assert e.actions[0].endswith("=") and e.actions[1].endswith("=") and "=" not in e.actions[2]
        assert str(evaluate_expression(e.prompt[:-1])) == e.answer == e.actions[2]
        env = CalculatorEnv()
        env.reset(e)
        r1, r2 = env.step(e.actions[0]).observation, env.step(e.actions[1]).observation
        assert r1 == str(evaluate_expression(a)) and r2 == str(evaluate_expression(b)) == e.answer
        assert env.step(e.actions[2]).reward == 1.0
        n = int(attn[i].sum())
        row, lab = ids[i, :n].tolist(), labels[i, :n].tolist()
        assert tok.decode(row) == f"<bos>{e.prompt}{e.actions[0]}<eos>{r1}{e.actions[1]}<eos>{r2}{e.actions[2]}<eos>"
        pieces, cur = [], []
        for t, l in zip(row, lab):
            if l != -100:
                cur.append(t)
                if t == tok.eos_token_id:
                    pieces.append(tok.decode(cur, skip_special_tokens=True))
                    cur = []
        assert pieces == list(e.actions) and not cur  # labels: exactly the three turns and their EOS


def test_demonstrations_that_do_not_replay_are_refused(tok):
    from creditlib.rl.multiturn import encode_demonstrations

    with pytest.raises(ValueError, match="no demonstration actions"):
        encode_demonstrations(tok, DialWalkEnv, [_dial(1, 3)])
    with pytest.raises(ValueError, match="ends at turn 1"):
        encode_demonstrations(tok, DialWalkEnv, [_dial(1, 3)], actions=[["+", "+", "+"]])
    with pytest.raises(ValueError, match="environment failed"):
        encode_demonstrations(tok, DialWalkEnv, [Example("bad", "1")], actions=[["+"]])
    ids, attn, labels = encode_demonstrations(tok, DialWalkEnv, [_dial(1, 3)], actions=[["+", "-"]])  # not done: fine
    assert tok.decode(ids[0]) == "<bos>3?1+<eos>3?2-<eos>"
