"""One group of multi-turn episodes and the credit each turn gets under each turn method (docs/agents.md).

    python recipes/demo_agents.py                 # prints the table, writes runs/demo_agents/agents_credit.png
    python recipes/demo_agents.py --out docs/img  # maintainers: replaces the tracked figure of docs/agents.md

Six episodes of the bundled dial walk (``--env dial-walk``, :mod:`creditlib.rl.envs`) from one
prompt, ``3?7``: reach position 3 from position 7, a move per turn (``+`` up, ``-`` down, mod 10),
at most ``distance + 2 = 6`` moves. The moves are written out here (three episodes reach the
target, three do not) and replayed in the real environment, which gives each episode's rows
exactly as a rollout packs them (:func:`creditlib.rl.multiturn.encode_demonstrations`: the
policy's turns, the environment's answers masked), its outcome reward, the state id before every
turn (the dial position and the target) and the dial-walk's process score of every move.

The picture: one panel per method, episodes as rows and turns as columns, each cell the credit
that every token of that turn gets (the move and the position it led to written in the cell):

* ``turn-grpo``: the episode's leave-one-out advantage on every turn;
* ``turn-index``: each turn's return against the other episodes' returns at the same turn index;
* ``anchor-state`` (GiGPO): the episode advantage plus the turn's return against the other
  episodes' turns that started from the same dial position;
* ``prefix-turn``: the return against the other episodes that made the same moves so far.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from creditlib import functional as F  # noqa: E402
from creditlib.rl.data import Example  # noqa: E402
from creditlib.rl.envs import DialWalkEnv, DialWalkScorer  # noqa: E402
from creditlib.rl.multiturn import encode_demonstrations  # noqa: E402
from creditlib.rl.task import build_char_tokenizer  # noqa: E402

PROMPT = "3?7"  # target 3, start 7: four moves down, or six moves up
EPISODES = ["----", "+-----", "--+---", "++----", "-+-+-+", "--+-+-"]  # three reach 3, three are cut at 6 moves
METHODS = ["turn-grpo", "turn-index", "anchor-state", "prefix-turn"]


def group(process_coef: float = 0.0):
    """The episodes as a rollout would pack them: ``(tokens [G, T], turn_ids [G, T], turn_rewards [G, K],
    state_ids [G, K], rewards [G], positions)``; ``positions[i][k]`` is the dial after move ``k``."""
    tok = build_char_tokenizer()
    ex = Example(PROMPT, "3")
    acts = [list(a) for a in EPISODES]
    ids, _, labels = encode_demonstrations(tok, DialWalkEnv, [ex] * len(acts), actions=acts,
                                           add_special_tokens=False)  # [G, L]: prompt, turns, answers
    P = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    tokens, mask = ids[:, P:], labels[:, P:] != -100  # [G, T] completion; True = a policy token
    turn_ids = F.turn_ids_from_mask(mask)  # [G, T]: each run of policy tokens is a turn (answers between)
    G, K = len(acts), max(len(a) for a in acts)
    turn_rewards = torch.zeros(G, K)  # [G, K]
    state_ids = torch.full((G, K), -1, dtype=torch.long)  # [G, K]
    rewards = torch.zeros(G)  # [G]
    positions = []
    scorer = DialWalkScorer()
    for i, moves in enumerate(acts):
        env = DialWalkEnv()
        state_ids[i, 0] = env.reset(ex).state_id
        pos = []
        for k, a in enumerate(moves):
            st = env.step(a)
            pos.append(int(st.observation.rsplit("?", 1)[-1]))
            if k + 1 < len(moves):
                state_ids[i, k + 1] = st.state_id
                turn_rewards[i, k] = st.reward  # 0 before the last move (the dial walk rewards the end only)
            else:
                assert st.done, f"episode {moves} should end at its last move"
                rewards[i] = st.reward
        if process_coef:
            turn_rewards[i, :len(moves)] += process_coef * torch.tensor(scorer.score(ex, moves, []))
        positions.append(pos)
    return tokens, turn_ids, turn_rewards, state_ids, rewards, positions


def credit(kind: str, tokens, turn_ids, turn_rewards, state_ids, rewards, turn_gamma: float = 1.0) -> torch.Tensor:
    """Per-turn credit ``[G, K]`` of ``kind`` on the group (one group: ``group_size = G``); ``turn_gamma``
    discounts later turns' rewards in the returns (prefix-turn's returns are undiscounted)."""
    kw = {"state_ids": state_ids} if kind == "anchor-state" else {"tokens": tokens} if kind == "prefix-turn" else {}
    gamma = 1.0 if kind == "prefix-turn" else turn_gamma
    return F.turn_credit(kind, turn_ids, turn_rewards, rewards, tokens.shape[0], per_turn=True, gamma=gamma,
                         **kw)  # [G, K]


def draw(table, positions, path: str) -> str:
    G, K = table[METHODS[0]].shape
    lim = max(float(t.abs().max()) for t in table.values())
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4.2 * len(METHODS), 3.6), sharey=True)
    for ax, name in zip(axes, METHODS):
        a = table[name].clone()  # [G, K]
        shown = torch.full_like(a, float("nan"))
        for i, moves in enumerate(EPISODES):
            shown[i, :len(moves)] = a[i, :len(moves)]
        im = ax.imshow(shown.numpy(), cmap="coolwarm_r", vmin=-lim, vmax=lim, aspect="auto")
        for i, moves in enumerate(EPISODES):
            for k, m in enumerate(moves):
                ax.text(k, i, f"{m} \u2192{positions[i][k]}\n{float(a[i, k]):+.2f}", ha="center", va="center",
                        fontsize=8)
        ax.set_title(name)
        ax.set_xticks(range(K), [f"turn {k}" for k in range(K)], fontsize=7)
        ax.set_xlabel("cell: move \u2192 position after it; credit")
    axes[0].set_yticks(range(G), [f"{e} ({'reached 3' if p[-1] == 3 else 'cut'})" for e, p in zip(EPISODES, positions)],
                      fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="credit of every token of the turn")
    fig.suptitle(f"dial walk {PROMPT} (target 3, start 7): one group of {G} episodes, the credit of each turn")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_agents",
                   help="folder for agents_credit.png (default: runs/demo_agents; docs/img replaces the tracked figure "
                        "of docs/agents.md)")
    p.add_argument("--process-coef", type=float, default=0.0,
                   help="add this times the dial-walk's process score of every move (1 = it brought the dial "
                        "closer) to the turn rewards (default 0: outcome only)")
    p.add_argument("--turn-gamma", type=float, default=1.0,
                   help="discount of later turns' rewards in a turn's return (turn-grpo, turn-index, anchor-state; "
                        "default 1)")
    args = p.parse_args(argv)
    if not args.process_coef >= 0:
        p.error("--process-coef must be >= 0")
    if not 0 <= args.turn_gamma <= 1:
        p.error("--turn-gamma must be in [0, 1]")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    tokens, turn_ids, turn_rewards, state_ids, rewards, positions = group(args.process_coef)
    table = {n: credit(n, tokens, turn_ids, turn_rewards, state_ids, rewards, args.turn_gamma) for n in METHODS}
    print(f"prompt {PROMPT!r}; rewards {rewards.tolist()}; credit per turn:")
    for n in METHODS:
        print(f"  {n}")
        for i, moves in enumerate(EPISODES):
            print(f"    {moves:8s} " + " ".join(f"{float(table[n][i, k]):+.2f}" for k in range(len(moves))))
    os.makedirs(args.out, exist_ok=True)
    path = draw(table, positions, os.path.join(args.out, "agents_credit.png"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
