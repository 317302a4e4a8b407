"""Per-turn credit on TRL 1.16's environment path (``environment_factory``), real GRPOTrainer, CPU.

The setup is TRL's own multi-turn tool loop, unpatched: a tiny Qwen2 built from a config, an
offline character tokenizer with a small tool-calling chat template and a transformers
``response_template`` that reads a digit ``0-4`` in the model's output as a call of the
environment's ``press(digit)`` tool (a random tiny model writes one in most turns, so rollouts
have several turns). The environment (:class:`Dial`, TRL's ``environment_factory`` contract:
``reset(**row)`` and public methods as tools) is a 5-position dial: ``press(d)`` moves it by
``d``, answers the new position (a tool result: masked by TRL's ``tool_mask``), records the
turn's reward (``+1`` on the target, ``-0.1`` per press) in ``turn_rewards`` and the state before
the next turn in ``state_ids`` (creditlib's convention); ``get_reward`` (the outcome) is 1 if the
dial ends on the target.

Checks: real training steps with ``turn-grpo`` and ``anchor-state``; the advantages TRL's loss
used equal ``F.turn_credit`` on the same rows (and, for ``turn-grpo``, a hand computation from the
environments' records); tool-result tokens get 0; every turn method's scoring step equals
``F.turn_credit``; missing inputs raise a ``ValueError`` that says what is missing; non-turn
methods are unchanged on the environment path.
"""

import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is experimental in TRL 1.16

import pytest
import torch

pytest.importorskip("trl", reason="TRL is the optional extra creditlib[trl]")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from creditlib import functional as F  # noqa: E402
from creditlib.integrations.trl import CreditConfig, CreditTrainer  # noqa: E402

G = 4  # num_generations
B = 2 * G  # two prompts per batch
MAX_LEN = 40  # max_completion_length: policy turns + tool results
POSITIONS = 5

# A tool-calling chat template for the char tokenizer: <u> user, <a> assistant (ends with <eos>), <t> tool.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}<u>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}<a>{{ m['content'] }}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}{%- for tc in m['tool_calls'] -%}"
    "{{ tc['function']['name'] }}{%- for k, v in tc['function']['arguments'].items() -%}{{ k }}{{ v }}{%- endfor -%}"
    "{%- endfor -%}{%- endif -%}<eos>"
    "{%- elif m['role'] == 'tool' -%}<t>{{ m['content'] }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<a>{%- endif -%}")
# transformers' response parser: the last digit 0-4 of a turn is a call press(digit); the rest is content.
RESPONSE_TEMPLATE = {
    "start_anchor": "<a>", "defaults": {"role": "assistant"},
    "fields": {
        "tool_calls": {"open_pattern": "(?P<digit>[0-4])", "close_pattern": "", "content": "text",
                       "transform": [{"type": "function",
                                      "function": {"name": "press", "arguments": {"digit": "{digit}"}}}]},
        "content": {"close": "<eos>", "content": "text"},
    },
}


class Dial:
    """A 5-position dial (TRL environment): ``press(digit)`` is the tool; creditlib reads
    ``turn_rewards`` and ``state_ids``."""

    record_states = True

    def __init__(self):
        self.pos = self.target = 0
        self.turn_rewards = []

    def reset(self, **row):
        self.pos, self.target = int(row["start"]), int(row["target"])
        self.turn_rewards = []  # entry k: the reward of the policy's turn k
        if self.record_states:
            self.state_ids = [self.pos]  # entry k: the state before turn k
        return None

    def press(self, digit: int) -> str:
        """Turn the dial.

        Args:
            digit: how many positions to turn the dial by.
        """
        self.pos = (self.pos + int(digit)) % POSITIONS
        self.turn_rewards.append((1.0 if self.pos == self.target else 0.0) - 0.1)
        if self.record_states:
            self.state_ids.append(self.pos)
        return str(self.pos)

    def get_reward(self) -> float:
        return 1.0 if self.pos == self.target else 0.0


class DialWithoutStates(Dial):
    record_states = False


class DialTwoEntriesPerPress(Dial):
    """Breaks the convention: two turn_rewards entries per turn."""

    def press(self, digit: int) -> str:
        """Turn the dial.

        Args:
            digit: how many positions to turn the dial by.
        """
        out = super().press(digit)
        self.turn_rewards.append(0.5)
        return out


# ----------------------------------------------------------------------------- fixtures
def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<u>": 3, "<a>": 4, "<t>": 5}
    for c in "01234xy":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<u>", "<a>", "<t>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.response_template = RESPONSE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_env")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model_dir = str(root / "tiny-qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    starts, targets = [0, 1, 2, 3], [3, 4, 0, 1]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": str(s)}] for s in starts],
                            "start": starts, "target": targets})
    return {"root": root, "tok": tok, "model": model_dir, "ds": ds}


def _args(env, **kw):
    base = dict(output_dir=str(env["root"] / "out"), per_device_train_batch_size=B, num_generations=G,
                max_completion_length=MAX_LEN, max_tool_calling_iterations=3, report_to="none",
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1,
                activation_checkpointing=True)
    base.update(kw)
    return CreditConfig(**base)


class Recording(CreditTrainer):
    """Keeps what each scoring step produced (rows, environments' records, TRL's rewards) and the
    advantages that reached TRL's loss."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        envs = self.environments or []
        self.scored = getattr(self, "scored", []) + [{
            "completion_ids": out["completion_ids"].clone(),
            "completion_mask": out["completion_mask"].clone(),
            "tool_mask": out["tool_mask"].clone() if "tool_mask" in out else None,
            "advantages": out["advantages"].clone(),
            "turn_rewards": [list(e.turn_rewards) for e in envs],
            "state_ids": [list(getattr(e, "state_ids", [])) for e in envs],
            "rewards": torch.tensor(list(self._logs["rewards"]["Dial"])[-out["completion_ids"].shape[0]:]
                                    if "Dial" in self._logs["rewards"] else [], dtype=torch.float64),
        }]
        return out

    def _compute_loss(self, model, inputs):
        self.loss_inputs = getattr(self, "loss_inputs", []) + [
            {k: inputs[k].detach().clone() for k in ("completion_ids", "advantages")}]
        return super()._compute_loss(model, inputs)


def _trainer(env, credit, factory=Dial, cls=Recording, **kw):
    return cls(model=env["model"], args=_args(env, credit=credit, **kw), train_dataset=env["ds"],
               processing_class=env["tok"], environment_factory=factory)


def _rows(env):
    ds = env["ds"]
    return [ds[i] for i in range(B // G) for _ in range(G)]  # what TRL's RepeatSampler yields


def _policy_mask(s):
    m = s["completion_mask"].bool()  # [B, T]
    return m if s["tool_mask"] is None else m & s["tool_mask"].bool()


def _padded(lists, K, fill, dtype):
    out = torch.full((len(lists), K), fill, dtype=dtype)  # [B, K]
    for i, row in enumerate(lists):
        row = row[:K]
        if row:
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _expected(s, kind, **kw):
    """``F.turn_credit`` on the scored rows (per token [B, T] and per turn [B, K]), float64."""
    pmask = _policy_mask(s)  # [B, T]
    turn_ids = F.turn_ids_from_mask(pmask)  # [B, T]
    K = max(1, int(turn_ids.max()) + 1)
    n_turns = (turn_ids.max(dim=1).values + 1).clamp(min=0).tolist()  # [B] K_i
    tr = _padded([r[:k] for r, k in zip(s["turn_rewards"], n_turns)], K, 0.0, torch.float64)  # [B, K]
    # a row left without policy tokens (mask_truncated_completions): its turn rewards join its outcome
    rewards = s["rewards"] + torch.tensor([sum(r) if k == 0 else 0.0 for r, k in zip(s["turn_rewards"], n_turns)],
                                          dtype=torch.float64)  # [B]
    extra = {}
    if kind == "anchor-state":
        extra["state_ids"] = _padded([r[:k] for r, k in zip(s["state_ids"], n_turns)], K, -1, torch.int64)
    if kind == "prefix-turn":
        extra.update(tokens=s["completion_ids"], mask=pmask)
    per_token = F.turn_credit(kind, turn_ids, tr, rewards, G, **extra, **kw)  # [B, T]
    per_turn = F.turn_credit(kind, turn_ids, tr, rewards, G, per_turn=True, **extra, **kw)  # [B, K]
    return per_token, per_turn, turn_ids


def _check_structure(s):
    """The batch is a real multi-turn batch: tool results inside completions, rows of several turns."""
    pmask = _policy_mask(s)
    inside_tool = s["completion_mask"].bool() & ~pmask  # [B, T] tool-result tokens
    assert inside_tool.any(), "TRL's tool loop must have run (tool results in the completions)"
    n_turns = (F.turn_ids_from_mask(pmask).max(dim=1).values + 1).tolist()
    assert max(n_turns) >= 2 and len(set(n_turns)) >= 2, n_turns
    assert any(len(r) > 0 for r in s["turn_rewards"])
    return inside_tool


def _match_loss_rows(s, loss):
    """TRL shuffles the generation batch before the loss: every loss row is a scored row, same advantages."""
    ids, adv = s["completion_ids"], s["advantages"]
    assert loss["advantages"].shape == adv.shape
    used = set()
    for i in range(ids.shape[0]):
        cand = [j for j in range(ids.shape[0]) if j not in used and torch.equal(loss["completion_ids"][i], ids[j])
                and torch.equal(loss["advantages"][i], adv[j])]
        assert cand, f"loss row {i} is no scored row with the same advantages"
        used.add(cand[0])


# ----------------------------------------------------------------------------- real training steps
@pytest.mark.parametrize("credit", ["turn-grpo", "anchor-state"])
def test_turn_credit_trains_a_real_environment_step(env, credit):
    trainer = _trainer(env, credit, learning_rate=5e-2, max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    assert len(trainer.scored) == 1 and len(trainer.loss_inputs) == 1
    s = trainer.scored[0]
    inside_tool = _check_structure(s)
    adv = s["advantages"]  # [B, T] what creditlib set
    assert adv.shape == s["completion_ids"].shape and adv.dtype == torch.float32
    expected, per_turn, turn_ids = _expected(s, credit)
    torch.testing.assert_close(adv, expected.float(), rtol=1e-5, atol=1e-6)
    assert bool((adv[inside_tool] == 0).all()) and bool((adv[~_policy_mask(s)] == 0).all())
    assert (adv != 0).any(), "the toy batch must carry a learning signal"
    # broadcast: every policy token carries its own turn's advantage (row and turn index)
    rows = torch.arange(B)[:, None].expand_as(turn_ids)
    on = turn_ids >= 0
    torch.testing.assert_close(adv[on].double(), per_turn[rows[on], turn_ids[on]], rtol=1e-5, atol=1e-6)
    _match_loss_rows(s, trainer.loss_inputs[0])
    assert logs[0]["creditlib/turns_mean"] == pytest.approx(float((turn_ids.max(1).values + 1).float().mean()))
    if credit == "turn-grpo":
        # by hand: G_i = R_i + the environment's turn rewards; (G_i - mean_{j != i} G_j) / (std + 1e-4)
        ret = [float(s["rewards"][i]) + sum(s["turn_rewards"][i]) for i in range(B)]
        for i in range(B):
            grp = ret[(i // G) * G:(i // G + 1) * G]
            others = [g for k, g in enumerate(grp) if k != i % G]
            mean = sum(grp) / G
            std = math.sqrt(sum((g - mean) ** 2 for g in grp) / (G - 1))
            want = (ret[i] - sum(others) / len(others)) / (std + 1e-4)
            torch.testing.assert_close(adv[i][_policy_mask(s)[i]].double(),
                                       torch.full((int(_policy_mask(s)[i].sum()),), want, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6)
    else:
        # the state term is not vacuous: anchor-state differs from turn-grpo on some turn
        episode, _, _ = _expected(s, "turn-grpo")
        assert (adv.double() - episode).abs().max() > 1e-3


# ----------------------------------------------------------------------------- every turn method's scoring step
@pytest.mark.parametrize("credit", ["turn-index", "prefix-turn"])
def test_turn_methods_scoring_step_equals_turn_credit(env, credit):
    trainer = _trainer(env, credit)
    trainer.model.train()
    torch.manual_seed(3)
    trainer._generate_and_score_completions(_rows(env))
    s = trainer.scored[0]
    _check_structure(s)
    expected, _, _ = _expected(s, credit)
    torch.testing.assert_close(s["advantages"], expected.float(), rtol=1e-5, atol=1e-6)
    assert bool((s["advantages"][~_policy_mask(s)] == 0).all())


def test_rows_masked_as_truncated_keep_their_return_in_the_baselines(env):
    """mask_truncated_completions: a truncated row has no policy token left (K_i = 0); its turn
    rewards join its outcome reward, so the other rows' baselines still see its whole return."""
    trainer = _trainer(env, "turn-grpo", mask_truncated_completions=True)
    trainer.model.train()
    torch.manual_seed(0)
    trainer._generate_and_score_completions(_rows(env))
    s = trainer.scored[0]
    pmask = _policy_mask(s)
    empty = ~pmask.any(dim=1)  # [B] rows TRL masked as truncated
    assert empty.any() and (~empty).any()
    assert any(s["turn_rewards"][i] for i in range(B) if empty[i]), "a truncated row must have stepped the env"
    expected, _, _ = _expected(s, "turn-grpo")
    torch.testing.assert_close(s["advantages"], expected.float(), rtol=1e-5, atol=1e-6)
    assert bool((s["advantages"][empty] == 0).all())
    # not vacuous: dropping the truncated rows' turn rewards changes some other row's advantage
    dropped = dict(s, turn_rewards=[[] if empty[i] else r for i, r in enumerate(s["turn_rewards"])])
    other, _, _ = _expected(dropped, "turn-grpo")
    assert (other.float() - s["advantages"]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- missing or malformed inputs
def test_anchor_state_without_an_environment_is_refused(env):
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1"}]] * 2})
    with pytest.raises(ValueError, match=r"'anchor-state' needs state_ids.*environment_factory"):
        CreditTrainer(model=env["model"], reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=_args(env, credit="anchor-state"), train_dataset=ds, processing_class=env["tok"])


def test_anchor_state_with_an_environment_without_state_ids_raises(env):
    trainer = _trainer(env, "anchor-state", factory=DialWithoutStates)
    trainer.model.train()
    with pytest.raises(ValueError, match=r"'anchor-state' needs state_ids: environment DialWithoutStates of row 0 "
                                         r"has no `state_ids` attribute"):
        trainer._generate_and_score_completions(_rows(env))


def test_more_turn_rewards_than_turns_raises(env):
    trainer = _trainer(env, "turn-grpo", factory=DialTwoEntriesPerPress)
    trainer.model.train()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"environment DialTwoEntriesPerPress of row \d+: turn_rewards has \d+ "
                                         r"entries .* policy turn\(s\)"):
        trainer._generate_and_score_completions(_rows(env))


# ----------------------------------------------------------------------------- non-turn methods: unchanged
def test_non_turn_method_keeps_trls_advantages_and_warns_once(env):
    """``grpo`` on the environment path: TRL's own group advantage of the outcome reward [B]; the
    per-turn rewards are not read, and the trainer says so once."""
    trainer = _trainer(env, "grpo")
    trainer.model.train()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer._generate_and_score_completions(_rows(env))
        trainer._generate_and_score_completions(_rows(env))
    ours = [w for w in caught if "does not read" in str(w.message)]
    assert len(ours) == 1 and "Dial.turn_rewards" in str(ours[0].message)
    s = trainer.scored[0]
    r = s["rewards"].view(-1, G)  # [B / G, G] TRL's outcome rewards
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)  # [B] TRL's formula
    assert s["advantages"].shape == (B,)
    torch.testing.assert_close(s["advantages"].double(), want, rtol=1e-5, atol=1e-6)


def test_environment_records_are_checked():
    """The convention's checks, on the helpers the trainer calls for each row."""
    from creditlib.integrations.trl import _check_state_ids, _check_turn_rewards, _env_sequence

    class Env:
        turn_rewards = [0.5, float("nan")]

        def state_ids(self):
            return [0]

    env = Env()
    with pytest.raises(ValueError, match=r"environment Env of row 3: state_ids is a method.*as a tool"):
        _env_sequence(env, "state_ids", 3)
    with pytest.raises(ValueError, match=r"environment Env of row 1: turn_rewards\[1\] = nan is not finite"):
        _check_turn_rewards(_env_sequence(env, "turn_rewards", 1), env, 1, 2)
    with pytest.raises(ValueError, match=r"turn_rewards\[0\] must be a number, got 'x'"):
        _check_turn_rewards(["x"], env, 0, 1)
    for bad in (1.5, -2, True):
        with pytest.raises(ValueError, match=r"state_ids\[1\] must be an int >= -1"):
            _check_state_ids([0, bad], env, 0)
    # past the row's turns: zeros are dropped silently, anything else is an error
    assert _check_turn_rewards([1.0, 0.0, 0.0], env, 0, 1) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"turn_rewards has 2 entries \[1.0, 2.0\] but the row has 1 policy turn"):
        _check_turn_rewards([1.0, 2.0], env, 0, 1)
    assert _env_sequence(object(), "state_ids", 0) is None
