"""The recipe on multi-turn environments (``recipes/grpo.py --env NAME``, issue 17).

Real episodes of the embedded tiny model against the bundled environments, real updates: every
turn method trains two steps; the advantages the loss receives are creditlib's turn credit of the
episodes that were sampled (observations 0); a trajectory-level method sees the episode's total
reward; an environment that raises or hangs costs its episodes, not the run; bad option
combinations are refused before anything is written.
"""

import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrl.objectives.llm.grpo")

from creditlib import functional as F  # noqa: E402
from creditlib.credit import get_credit  # noqa: E402
from creditlib.rl.config import build_parser, load_config  # noqa: E402
from creditlib.rl.env import Step, register_env  # noqa: E402
from creditlib.rl.envs import DialWalkEnv, DialWalkSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_env_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


grpo = _load("grpo")

TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--eval-size", "8", "--sft-steps", "4", "--sft-eval-every", "2", "--sft-batch-size", "16",
        "--sft-target-accuracy", "0", "--prompts-per-step", "4", "--group-size", "4", "--no-progress",
        "--num-threads", "1", "--no-plot"]
TURN_METHODS = ["turn-grpo", "turn-index", "anchor-state", "prefix-turn"]


def _rl(path):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r.get("phase") == "rl"]


@pytest.mark.parametrize("name", TURN_METHODS)
def test_every_turn_method_trains_two_multi_turn_steps(name, tmp_path, capsys):
    out = tmp_path / name
    s = grpo.main(TINY + ["--env", "dial-walk", "--credit", name, "--max-steps", "2", "--eval-every", "2",
                          "--output-dir", str(out), "--seed", "3", "--process-coef", "0.1"])
    text = capsys.readouterr().out
    assert s["env"] == "dial-walk" and s["credit"] == name and s["failed_episodes"] == 0
    assert "environment 'dial-walk'" in text and "episodes per prompt against --env dial-walk" in text
    rl = _rl(out / "metrics.jsonl")
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        assert r["episodes"] == 16 and 1 <= r["mean_turns"] <= 7  # 4 prompts x 4 episodes, dial-walk's turn cap
        assert r["row_tokens"] > r["generated_tokens"] > 0  # the rows hold observations besides the policy's tokens
        assert torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all()
    assert (out / "final" / "model.safetensors").is_file()


def _capture(r):
    """Wrap the recipe's loss so that every tensordict it scores is kept."""
    seen, loss_fn = [], r.loss_fn

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = loss_fn

        def forward(self, td):
            seen.append(td.clone())
            return self.inner(td)

    r.loss_fn = Spy()
    return seen


@pytest.mark.parametrize("name", ["anchor-state", "turn-index", "grpo"])
def test_the_loss_receives_the_turn_credit_of_the_sampled_episodes(name, tmp_path):
    argv = TINY + ["--env", "dial-walk", "--credit", name, "--max-steps", "1", "--output-dir", str(tmp_path / "run"),
                   "--seed", "5", "--process-coef", "0.5"]
    cfg = grpo.parse_args(argv, defaults=grpo.DEFAULTS)
    r = grpo.setup(cfg)
    seen = _capture(r)
    torch.manual_seed(11)
    examples, _ = r.source.next_batch(0, cfg.prompts_per_step)
    ids, mask = r.source.encode(examples, r.device)  # [K, P]
    batch, shape = grpo.sample_rollout(r, examples, ids, mask, 1)
    assert shape["episodes"] == 16 and batch.turn_rewards.abs().sum() > 0  # process scores reach the turn rewards
    grpo.grpo_step(r, batch, batch.rewards)
    (td,) = seen
    adv = td["advantage"].squeeze(-1)  # [B, T]
    method = get_credit(name)
    if method.advantage_kind.turns:
        want = F.turn_credit(name, batch.turn_ids, batch.turn_rewards, batch.rewards, cfg.group_size,
                             state_ids=batch.state_ids if method.advantage_kind.needs_states else None)  # [B, T]
        torch.testing.assert_close(adv, want.to(adv.dtype))
    else:  # a trajectory-level method judges the episode's total reward (outcome + turn rewards)
        torch.testing.assert_close(td["reward"].reshape(-1), batch.total_rewards())
        want = F.group_advantage(batch.total_rewards(), cfg.group_size)  # [B]
        torch.testing.assert_close(adv, want[:, None].expand_as(adv).to(adv.dtype))
    observations = batch.attention_mask & ~batch.completion_mask  # [B, T] attended to, never scored
    assert observations.any()
    assert bool((td[grpo.ATTENTION] == batch.attention_mask).all())
    if method.per_token:
        assert bool((adv[observations] == 0).all())
    assert bool((td["masks", "response"] == batch.completion_mask).all())  # the loss scores policy tokens only


class _FlakyDial(DialWalkEnv):
    """Dial-walk whose second move raises in one episode of four and hangs in another."""

    made = 0

    def __init__(self, slack: int = 2):
        super().__init__(slack)
        _FlakyDial.made += 1
        self.kind = _FlakyDial.made % 4

    def step(self, action: str) -> Step:
        if self.turn == 1 and self.kind == 1:
            raise RuntimeError("the simulator crashed")
        if self.turn == 1 and self.kind == 2:
            time.sleep(3.0)
        return super().step(action)


class _FlakySource(DialWalkSource):
    """Rollouts meet the flaky environment; the problems' demonstrations are replayed in a sound one."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.make_env = functools.partial(_FlakyDial, 2)

    def _solution(self, prompt, answer, actions, explore=0):
        flaky, self.make_env = self.make_env, functools.partial(DialWalkEnv, 2)
        try:
            return super()._solution(prompt, answer, actions, explore)
        finally:
            self.make_env = flaky


def test_failing_and_hanging_episodes_get_reward_zero_and_the_run_goes_on(tmp_path, capsys):
    register_env("flaky-dial", _FlakyDial, source=lambda cfg, tok: _FlakySource(tok),
                 description="dial-walk that raises or hangs (test)", overwrite=True)
    out = tmp_path / "flaky"
    s = grpo.main(TINY + ["--env", "flaky-dial", "--credit", "turn-grpo", "--max-steps", "2", "--eval-every", "2",
                          "--output-dir", str(out), "--env-timeout", "0.3", "--sft-steps", "0", "--eval-size", "4"])
    text = capsys.readouterr().out
    rl = _rl(out / "metrics.jsonl")
    assert [r["step"] for r in rl] == [1, 2]
    assert sum(r["failed_episodes"] for r in rl) == s["failed_episodes"] > 0
    assert "episode(s) failed and got reward 0" in text and "failed episodes" in text


@pytest.mark.parametrize("argv, match", [
    (["--env", "dial-wlk"], "did you mean 'dial-walk'"),
    (["--env", "dial-walk", "--dataset", "gsm8k"], "the environment brings its own problems"),
    (["--max-turns", "3"], "--max-turns shape multi-turn episodes, which are off"),
    (["--credit", "anchor-state"], "needs the environment's state ids"),
    (["--env", "calculator", "--process-coef", "0.1"], "has no process reward"),
    (["--env", "dial-walk", "--tree-roots", "2"], "tree rollouts are single-turn"),
    (["--env", "dial-walk", "--process-coef", "-1"], "process_coef must be"),
    (["--env", "dial-walk", "--credit", "anchor-state", "--omega", "-1"], "omega"),
])
def test_bad_env_options_are_refused_naming_the_option(argv, match, tmp_path):
    ns = vars(build_parser(defaults=grpo.DEFAULTS).parse_args(argv + ["--output-dir", str(tmp_path / "never")]))
    ns.pop("config")
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides=ns, defaults=grpo.DEFAULTS)
    assert not (tmp_path / "never").exists()
