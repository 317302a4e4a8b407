"""Multi-turn rollouts (creditlib.rl.multiturn) with a real tiny Qwen2, the char tokenizer and the
bundled environments: every row is checked against a replay of its actions in a fresh environment."""

import random
import time

import pytest
import torch

pytest.importorskip("transformers")

from creditlib.rl.data import Example  # noqa: E402
from creditlib.rl.env import Reset, Step, stable_state_id  # noqa: E402
from creditlib.rl.envs import (CalculatorSource, DialWalkEnv, DialWalkScorer, DialWalkSource,  # noqa: E402
                               dial_distance, parse_dial_prompt)
from creditlib.rl.model import completion_logits, tiny_qwen2  # noqa: E402
from creditlib.rl.multiturn import EpisodeBatch, evaluate_episodes, rollout_episodes  # noqa: E402
from creditlib.rl.task import build_char_tokenizer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two contended ones (the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def src(tok):
    return DialWalkSource(tok)


@pytest.fixture(scope="module")
def rand_model(tok):
    torch.manual_seed(0)
    return tiny_qwen2(len(tok), 32, 1, 2, 64)


@pytest.fixture(scope="module")
def warm_model(tok, src):
    """A model warmed up briefly on dial-walk demonstrations: it moves "+"/"-" and stops with EOS,
    often in the right direction, so sampled episodes mix successes, cuts and revisits."""
    return _warm_up(tok, src, (32, 2, 2, 64), lr=3e-3, steps=60, batch=16)


def _warm_up(tok, src, shape, *, lr: float, steps: int, batch: int):
    """A tiny Qwen2 of ``shape`` (hidden, layers, heads, MLP) trained ``steps`` AdamW steps on the
    source's demonstration episodes (labels on the policy's turns only)."""
    torch.manual_seed(0)
    model = tiny_qwen2(len(tok), *shape)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pos = 0
    for _ in range(steps):
        exs, pos = src.next_batch(pos, batch)
        ids, attn, labels = src.encode_sft(exs)  # [batch, L]
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _turn_ids_from_mask():
    try:
        from creditlib import functional as F
    except Exception:  # pragma: no cover - the core is being edited elsewhere
        return None
    return getattr(F, "turn_ids_from_mask", None)


def check_against_replay(b: EpisodeBatch, examples, tok, make_env, *, max_turns, max_turn_tokens,
                         scorer=None, coef=0.0, max_total_tokens=None):
    """Every row of ``b`` equals a fresh environment's replay of the row's own actions: layout,
    masks, turn ids, states, rewards, cut flags. Returns counts of what was seen."""
    G, eos, pad = b.group_size, tok.eos_token_id, tok.pad_token_id
    B, T = b.completion_ids.shape
    assert b.batch_size == B == len(examples) * G and len(b.texts) == len(b.errors) == B
    K = b.turn_rewards.shape[1]
    assert b.state_ids.shape == (B, K) and b.turn_ids.dtype == torch.int64 and b.state_ids.dtype == torch.int64
    assert b.turn_rewards.dtype == b.rewards.dtype == torch.float32 and b.completion_mask.dtype == torch.bool
    seen = {"no_eos_turns": 0, "eos_turns": 0, "successes": 0, "truncated": 0, "env_cut": 0}
    total_policy = 0
    for i in range(B):
        ex = examples[i // G]
        assert b.prompt_ids[i][b.prompt_mask[i].bool()].tolist() == tok(ex.prompt)["input_ids"]
        assert not b.failed[i] and b.errors[i] == ""
        L = int(b.attention_mask[i].sum())
        assert bool(b.attention_mask[i, :L].all()) and not bool(b.attention_mask[i, L:].any())
        assert bool((b.completion_ids[i, L:] == pad).all()) and not bool(b.completion_mask[i, L:].any())
        assert bool((b.turn_ids[i, L:] == -1).all())
        row, mask = b.completion_ids[i, :L].tolist(), b.completion_mask[i, :L].tolist()
        tids = b.turn_ids[i, :L].tolist()
        assert [t >= 0 for t in tids] == mask  # turn ids exactly on the policy tokens
        n = int(b.num_turns[i])
        valid = [t for t in tids if t >= 0]
        assert valid == sorted(valid) and (not valid or valid[-1] == n - 1)
        env = make_env()
        r = env.reset(ex)
        want = tok(r.observation, add_special_tokens=False)["input_ids"] if r.observation else []
        state, env_rewards, actions, observations, st = r.state_id, [], [], [], None
        for k in range(n):
            pos = [j for j, t in enumerate(tids) if t == k]
            assert pos and pos == list(range(pos[0], pos[-1] + 1))  # one contiguous span per turn
            assert pos[0] == len(want)  # right after the previous observation
            toks = [row[j] for j in pos]
            if toks[-1] == eos:
                seen["eos_turns"] += 1
            else:
                assert max_total_tokens is not None or len(toks) == max_turn_tokens  # cut at the cap, no EOS
                seen["no_eos_turns"] += 1
            assert eos not in toks[:-1] and len(toks) <= max_turn_tokens
            want += toks
            assert int(b.state_ids[i, k]) == state
            a = tok.decode(toks, skip_special_tokens=True)
            st = env.step(a)
            actions.append(a)
            observations.append(st.observation)
            env_rewards.append(st.reward)
            if k < n - 1:
                assert not st.done
                want += tok(st.observation, add_special_tokens=False)["input_ids"]
                state = st.state_id
        assert row == want  # policy tokens and observations, in order, nothing else
        assert b.texts[i] == tok.decode(row, skip_special_tokens=True)
        assert bool((b.state_ids[i, n:] == -1).all())
        if n:
            assert bool(b.truncated[i]) == (not st.done)
            if b.truncated[i]:
                seen["truncated"] += 1
                assert n == max_turns or max_total_tokens is not None
            elif env_rewards[-1] > 0:
                seen["successes"] += 1
            else:
                seen["env_cut"] += 1
            scores = scorer.score(ex, actions, observations) if scorer is not None else [0.0] * n
            want_turn = [env_rewards[k] * (k < n - 1) + coef * scores[k] for k in range(n)]
            torch.testing.assert_close(b.turn_rewards[i, :n], torch.tensor(want_turn), rtol=0, atol=1e-6)
            assert float(b.rewards[i]) == env_rewards[-1]
            if scorer is not None:
                assert b.process_scores[i, :n].tolist() == scores
        assert bool((b.turn_rewards[i, n:] == 0).all())
        total_policy += sum(mask)
    assert b.generated_tokens == total_policy if max_total_tokens is None else b.generated_tokens >= total_policy
    assert b.row_tokens == int(b.attention_mask.sum())
    return seen


# ----------------------------------------------------------------------------- layout and replay
@pytest.mark.parametrize("which", ["random", "warm"])
def test_dial_rollout_rows_match_a_replay_in_a_fresh_env(which, tok, src, rand_model, warm_model, capsys):
    model = rand_model if which == "random" else warm_model
    torch.manual_seed(1)
    exs = src.next_batch(0, 6)[0]
    mt, mtt = src.max_turns, 3
    b = rollout_episodes(model, tok, src.make_env, exs, 4, max_turns=mt, max_turn_tokens=mtt)
    assert capsys.readouterr().out == ""  # quiet: the recipe shows progress
    seen = check_against_replay(b, exs, tok, src.make_env, max_turns=mt, max_turn_tokens=mtt)
    assert not bool(b.failed.any()) and b.group_size == 4
    if which == "random":  # most turns reach the cap without EOS, some end early with one
        assert seen["no_eos_turns"] > 0 and seen["eos_turns"] > 0
    else:  # the warm model finishes some walks and gets others cut by the env
        assert seen["successes"] > 0 and seen["env_cut"] > 0
    tim = _turn_ids_from_mask()
    if tim is not None:  # every observation is 'g?p' (3 chars), so no two turns touch: the mask's runs are the turns
        assert torch.equal(tim(b.completion_mask), b.turn_ids)


class SilentEnv:
    """Never ends and answers nothing (an empty observation): turns touch each other in the row."""

    def reset(self, example):
        self.n = 0
        return Reset("", stable_state_id("silent", 0))

    def step(self, action):
        self.n += 1
        return Step("", 0.5, False, stable_state_id("silent", self.n))


def test_turns_without_eos_and_empty_observations_stay_separate_and_endless_envs_are_cut(tok, rand_model):
    torch.manual_seed(2)
    exs = [Example("1?2", "1"), Example("5?9", "5")]
    b = rollout_episodes(rand_model, tok, SilentEnv, exs, 3, max_turns=4, max_turn_tokens=2)
    seen = check_against_replay(b, exs, tok, SilentEnv, max_turns=4, max_turn_tokens=2)
    assert bool(b.truncated.all()) and b.num_turns.tolist() == [4] * 6
    assert seen["no_eos_turns"] > 0  # a turn cut at the cap without EOS, followed directly by the next turn
    assert bool((b.completion_mask == b.attention_mask).all())  # no observation tokens at all
    assert (b.turn_ids.max(1).values + 1).tolist() == [4] * 6  # four turns each, counted by the turn counter
    # the outcome is the last step's reward; the earlier steps' rewards are turn rewards
    assert b.rewards.tolist() == [0.5] * 6 and b.turn_rewards.tolist() == [[0.5, 0.5, 0.5, 0.0]] * 6
    assert b.state_ids.tolist() == [[stable_state_id("silent", k) for k in range(4)]] * 6
    tim = _turn_ids_from_mask()
    if tim is not None:  # runs of valid tokens would merge the four turns into one
        assert bool((tim(b.completion_mask).max(1).values == 0).all())


def test_anchor_states_repeat_across_a_group(tok, src, warm_model):
    torch.manual_seed(3)
    exs = src.next_batch(100, 4)[0]
    G = 8
    b = rollout_episodes(warm_model, tok, src.make_env, exs, G, max_turns=src.max_turns, max_turn_tokens=2)
    check_against_replay(b, exs, tok, src.make_env, max_turns=src.max_turns, max_turn_tokens=2)
    shared = 0
    for k, ex in enumerate(exs):
        g, s = parse_dial_prompt(ex.prompt)
        rows = range(k * G, (k + 1) * G)
        assert {int(b.state_ids[i, 0]) for i in rows} == {stable_state_id("dial-walk", s, g)}
        where = {}
        for i in rows:
            ids = b.state_ids[i, :int(b.num_turns[i])].tolist()
            for t, u in enumerate(ids):
                if t > 0:
                    where.setdefault(u, set()).add(i)
        shared += sum(1 for u, r in where.items() if len(r) >= 2)
    assert shared > 0  # a later state reached by two different episodes of one group: a real anchor group


# ----------------------------------------------------------------------------- failures
class FlakyDial(DialWalkEnv):
    """Dial-walk, except that on prompt "9?4" step 1 raises and on prompt "2?6" step 0 hangs."""

    def step(self, action):
        if self.goal == 9 and self.turn == 1:
            raise ZeroDivisionError("flaky env")
        if self.goal == 2 and self.turn == 0:
            time.sleep(30)
        return super().step(action)


def test_a_raising_and_a_hanging_env_fail_only_their_episodes(tok, src, rand_model):
    exs = [Example("9?4", "9"), Example("2?6", "2"), Example("0?3", "0"), Example("7?5", "7")]
    torch.manual_seed(4)
    t0 = time.monotonic()
    b = rollout_episodes(rand_model, tok, FlakyDial, exs, 2, max_turns=7, max_turn_tokens=2, timeout=0.3)
    assert time.monotonic() - t0 < 25  # two hung calls were cut at 0.3 s each, not waited out
    assert b.failed.tolist() == [True, True, True, True, False, False, False, False]
    assert all("ZeroDivisionError: flaky env" in e and e.startswith("turn 1:") for e in b.errors[:2])
    assert all("timed out after 0.3 s" in e and e.startswith("turn 0:") for e in b.errors[2:4])
    assert b.errors[4:] == [""] * 4
    assert b.num_turns[:4].tolist() == [2, 2, 1, 1]  # the failing turn's tokens stay in the row
    assert float(b.rewards[:4].abs().sum()) == 0 and float(b.turn_rewards[:4].abs().sum()) == 0
    assert b.summary()["failed_episodes"] == 4.0
    # the other episodes are untouched: they match a replay in the plain environment
    ok = b.select(torch.arange(4, 8))
    check_against_replay(ok, exs[2:], tok, DialWalkEnv, max_turns=7, max_turn_tokens=2)


def test_failing_factories_resets_and_scorers_are_failed_episodes(tok, rand_model):
    calls = {"n": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("no env")
        return DialWalkEnv()

    class BadScorer:
        def score(self, example, actions, observations):
            if example.prompt == "3?8":
                raise ValueError("cannot score")
            return [1.0] * len(actions)

    exs = [Example("1?2", "1"), Example("bad prompt", "1"), Example("3?8", "3")]
    b = rollout_episodes(rand_model, tok, factory, exs, 2, max_turns=3, max_turn_tokens=2,
                         process_reward=BadScorer(), process_coef=1.0)
    assert b.failed.tolist() == [False, True, True, True, True, True]
    assert "make_env() raised OSError: no env" in b.errors[1] and int(b.num_turns[1]) == 0
    assert all("env.reset raised ValueError" in e for e in b.errors[2:4]) and b.num_turns[2:4].tolist() == [0, 0]
    assert all("process_reward.score raised ValueError: cannot score" in e for e in b.errors[4:])
    assert bool((b.num_turns[4:] > 0).all()) and float(b.process_scores[4:].abs().sum()) == 0
    assert float(b.turn_rewards[1:].abs().sum()) == 0 and float(b.rewards[1:].abs().sum()) == 0
    assert b.turn_rewards[0, :int(b.num_turns[0])].tolist() == [1.0] * int(b.num_turns[0])  # coef * score, not failed
    assert not bool(b.attention_mask[1:4].any())  # no turn, no tokens


# ----------------------------------------------------------------------------- process rewards
def test_process_reward_enters_turn_rewards(tok, src, warm_model):
    torch.manual_seed(5)
    exs = src.next_batch(200, 5)[0]
    sc = DialWalkScorer()
    b = rollout_episodes(warm_model, tok, src.make_env, exs, 4, max_turns=src.max_turns, max_turn_tokens=2,
                         process_reward=sc, process_coef=0.25)
    check_against_replay(b, exs, tok, src.make_env, max_turns=src.max_turns, max_turn_tokens=2, scorer=sc, coef=0.25)
    ps = b.process_scores[b.turn_ids.max(1).values >= 0]
    assert set(ps.flatten().tolist()) == {0.0, 1.0}  # right and wrong moves both occur
    s = b.summary()
    n = int(b.num_turns.sum())
    assert s["process_score"] == pytest.approx(float(b.process_scores.sum()) / n)
    assert s["mean_return"] == pytest.approx(float((b.rewards + b.turn_rewards.sum(-1)).mean()))
    assert s["success_rate"] == pytest.approx(float((b.rewards > 0).float().mean()))
    assert set(s) == {"episodes", "failed_episodes", "truncated_episodes", "mean_turns", "success_rate",
                      "mean_return", "generated_tokens", "row_tokens", "process_score"}
    assert all(isinstance(v, float) for v in s.values())


# ----------------------------------------------------------------------------- ids, greedy, eval
class RecordingDial(DialWalkEnv):
    log = []

    def step(self, action):
        RecordingDial.log.append(action)
        return super().step(action)


def test_row_ids_are_the_sampled_ids_never_retokenised(tok, src, rand_model):
    exs = src.next_batch(0, 4)[0]
    # greedy: every policy token of the row is the model's argmax given the row before it, with the
    # observations attended: the row is exactly the context the model generated from
    b = rollout_episodes(rand_model, tok, src.make_env, exs, 1, max_turns=5, max_turn_tokens=4, greedy=True)
    with torch.no_grad():
        logits = completion_logits(rand_model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.attention_mask)
    chosen = logits.gather(-1, b.completion_ids[..., None]).squeeze(-1)  # [B, T]
    gap = (logits.max(-1).values - chosen)[b.completion_mask]
    assert float(gap.max()) < 1e-4
    # sampled: the env gets the decoded text of the ids in the row, and ids that decoding drops
    # (<pad>, <bos>, <unk> sampled mid-turn) stay in the row: nothing was re-encoded from text
    RecordingDial.log = []
    torch.manual_seed(6)
    b = rollout_episodes(rand_model, tok, RecordingDial, exs, 4, max_turns=5, max_turn_tokens=4)
    turns = []
    for i in range(b.batch_size):
        for k in range(int(b.num_turns[i])):
            turns.append(b.completion_ids[i][b.turn_ids[i] == k].tolist())
    # the env saw each turn's text (turn by turn; within a turn, the running episodes in row order)
    assert len(RecordingDial.log) == len(turns)
    by_turn = []
    for k in range(int(b.num_turns.max())):
        for i in range(b.batch_size):
            if k < int(b.num_turns[i]):
                by_turn.append(tok.decode(b.completion_ids[i][b.turn_ids[i] == k].tolist(), skip_special_tokens=True))
    assert RecordingDial.log == by_turn
    special = {tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}
    kept = [t for t in turns if special & set(t)]
    assert kept  # such ids were sampled, and the row holds them
    assert any(tok(tok.decode(t, skip_special_tokens=True), add_special_tokens=False)["input_ids"] != t for t in kept)
    # the log-probs a trainer computes attend to the observations and score the policy tokens only
    lp = b.logprobs(rand_model)  # [B, T]
    logits = completion_logits(rand_model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.attention_mask)
    want = torch.log_softmax(logits.float(), -1).gather(-1, b.completion_ids[..., None]).squeeze(-1)  # [B, T]
    torch.testing.assert_close(lp, torch.where(b.completion_mask, want, 0.0), rtol=0, atol=1e-5)
    hidden = completion_logits(rand_model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    assert not torch.allclose(hidden[b.completion_mask], logits[b.completion_mask])  # observations matter


def test_greedy_rollouts_and_evaluation_are_deterministic(tok, src, warm_model):
    held = src.heldout(20)
    kw = dict(max_turns=src.max_turns, max_turn_tokens=src.max_turn_tokens)
    torch.manual_seed(7)
    a = rollout_episodes(warm_model, tok, src.make_env, held[:6], 3, greedy=True, **kw)
    torch.manual_seed(8)
    b = rollout_episodes(warm_model, tok, src.make_env, held[:6], 3, greedy=True, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.rewards, b.rewards)
    for k in range(6):  # greedy: the group's episodes are one episode
        assert all(torch.equal(a.completion_ids[3 * k], a.completion_ids[3 * k + j]) for j in (1, 2))
    r1 = evaluate_episodes(warm_model, tok, src.make_env, held, process_reward=DialWalkScorer(), batch_size=7, **kw)
    r2 = evaluate_episodes(warm_model, tok, src.make_env, held, process_reward=DialWalkScorer(), **kw)
    assert r1 == r2 and r1["episodes"] == 20.0
    one = rollout_episodes(warm_model, tok, src.make_env, held, 1, greedy=True, process_reward=DialWalkScorer(), **kw)
    s = one.summary()
    for key in ("success_rate", "mean_return", "mean_turns", "process_score"):
        assert r1[key] == pytest.approx(s[key])
    with pytest.raises(ValueError, match="greedily"):
        evaluate_episodes(warm_model, tok, src.make_env, held, greedy=False, **kw)


def test_max_total_tokens_caps_each_row(tok, src, rand_model):
    torch.manual_seed(9)
    exs = src.next_batch(0, 4)[0]
    b = rollout_episodes(rand_model, tok, src.make_env, exs, 2, max_turns=7, max_turn_tokens=3, max_total_tokens=7)
    assert int(b.attention_mask.sum(1).max()) <= 7 and b.completion_ids.shape[1] <= 7
    check_against_replay(b, exs, tok, src.make_env, max_turns=7, max_turn_tokens=3, max_total_tokens=7)
    assert bool(b.truncated.any())


def test_calculator_rollout_matches_a_replay(tok, rand_model):
    csrc = CalculatorSource(tok, heldout_sizes={"test": 4, "val": 1})
    exs = csrc.next_batch(0, 3)[0]
    torch.manual_seed(10)
    b = rollout_episodes(rand_model, tok, csrc.make_env, exs, 3, max_turns=csrc.max_turns,
                         max_turn_tokens=csrc.max_turn_tokens)
    check_against_replay(b, exs, tok, csrc.make_env, max_turns=csrc.max_turns, max_turn_tokens=csrc.max_turn_tokens)


def test_select_and_argument_errors(tok, src, rand_model):
    exs = src.next_batch(0, 3)[0]
    torch.manual_seed(11)
    b = rollout_episodes(rand_model, tok, src.make_env, exs, 2, max_turns=3, max_turn_tokens=2,
                         process_reward=DialWalkScorer())
    s = b.select(torch.tensor([5, 0]))
    assert torch.equal(s.completion_ids, b.completion_ids[[5, 0]]) and s.texts == [b.texts[5], b.texts[0]]
    assert torch.equal(s.process_scores, b.process_scores[[5, 0]]) and s.errors == [b.errors[5], b.errors[0]]
    assert s.generated_tokens == int(b.completion_mask[[5, 0]].sum()) and s.batch_size == 2
    kw = dict(max_turns=2, max_turn_tokens=2)
    bad = [(dict(group_size=0), "group_size"), (dict(max_turns=0), "max_turns"),
           (dict(max_turn_tokens=1.5), "max_turn_tokens"), (dict(temperature=0.0), "temperature"),
           (dict(process_coef=0.5), "needs a process_reward"), (dict(process_coef=float("nan")), "process_coef"),
           (dict(process_reward=object()), "score"), (dict(max_total_tokens=0), "max_total_tokens"),
           (dict(timeout=-1.0), "timeout")]
    for extra, msg in bad:
        args = dict(kw, **extra)
        G = args.pop("group_size", 2)
        with pytest.raises(ValueError, match=msg):
            rollout_episodes(rand_model, tok, src.make_env, exs, G, **args)
    with pytest.raises(ValueError, match="examples"):
        rollout_episodes(rand_model, tok, src.make_env, [], 2, **kw)
    with pytest.raises(ValueError, match="prompt"):
        rollout_episodes(rand_model, tok, src.make_env, ["1?2"], 2, **kw)
    with pytest.raises(ValueError, match="make_env"):
        rollout_episodes(rand_model, tok, "dial-walk", exs, 2, **kw)


def test_turn_credit_runs_on_a_rollout(tok, src, warm_model):
    try:
        from creditlib import functional as F
    except Exception:  # pragma: no cover
        pytest.skip("creditlib.functional does not import")
    if not hasattr(F, "turn_credit"):
        pytest.skip("F.turn_credit is not there yet")
    torch.manual_seed(12)
    exs = src.next_batch(300, 3)[0]
    b = rollout_episodes(warm_model, tok, src.make_env, exs, 4, max_turns=src.max_turns, max_turn_tokens=2,
                         process_reward=DialWalkScorer(), process_coef=0.1)
    adv = F.turn_credit("anchor-state", b.turn_ids, b.turn_rewards, b.rewards, b.group_size, state_ids=b.state_ids)
    assert adv.shape == b.completion_ids.shape and bool(torch.isfinite(adv).all())
    assert bool((adv[~b.completion_mask] == 0).all())


# ----------------------------------------------------------------------------- learnability
def _random_policy_success(pairs, slack=2):
    """Exact success probability of the uniform random +/- policy (the chance level)."""
    out = []
    for s, g in pairs:
        T = dial_distance(s, g) + slack
        p = {s: 1.0}
        succ = 0.0
        for _ in range(T):
            q = {}
            for pos, w in p.items():
                for d in (1, -1):
                    n = (pos + d) % 10
                    if n == g:
                        succ += w / 2
                    else:
                        q[n] = q.get(n, 0.0) + w / 2
            p = q
        out.append(succ)
    return sum(out) / len(out)


def _constant_policy_success(pairs, move, slack=2):
    ok = 0
    for s, g in pairs:
        env = DialWalkEnv(slack)
        env.reset(Example(f"{g}?{s}", str(g)))
        while True:
            st = env.step(move)
            if st.done:
                ok += st.reward > 0
                break
    return ok / len(pairs)


@pytest.mark.slow  # 11-32 s on one thread of a shared 2-core machine (measured)
def test_sft_warmup_on_demonstrations_learns_the_dial(tok, src):
    """A tiny model warmed up on the demonstrations (shortest paths, half of them after an untrained
    detour) solves the training pairs and beats the uniform random policy (the chance level, ~0.30)
    on the held-out pairs. This short warm-up (300 steps of 32 at lr 2e-3, MLP 256) reached 0.63 on
    the 30 test + val pairs (measured 2026-12-06), below the best constant policy (always "+": 0.67
    with slack 2); the recipe's longer one (300 steps of 64, MLP 512) reaches 1.0 on the 20 test
    pairs (creditlib.rl.envs' docstring), so only the chance level is asserted here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sft_smoke(tok, src)
    finally:
        torch.set_num_threads(threads)


def _sft_smoke(tok, src):
    model = _warm_up(tok, src, (128, 2, 4, 256), lr=2e-3, steps=300, batch=32)
    kw = dict(max_turns=src.max_turns, max_turn_tokens=src.max_turn_tokens, process_reward=DialWalkScorer())
    train = [src.example(s, g, random.Random(0)) for s, g in src.train_pairs]
    held = src.heldout(100) + src.validation(100)
    held_pairs = [parse_dial_prompt(e.prompt)[::-1] for e in held]
    r_train = evaluate_episodes(model, tok, src.make_env, train, **kw)
    r_held = evaluate_episodes(model, tok, src.make_env, held, **kw)
    chance = _random_policy_success(held_pairs)
    constant = max(_constant_policy_success(held_pairs, m) for m in "+-")
    print(f"train pairs: {r_train}\nheld-out pairs: {r_held}\nrandom policy {chance:.3f}, best constant {constant:.3f}")
    assert r_train["success_rate"] >= 0.9 and r_train["failed_episodes"] == 0
    assert r_held["success_rate"] >= chance + 0.2
