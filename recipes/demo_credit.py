"""The credit each creditlib method gives one sample group, side by side (docs/credit.md).

    python recipes/demo_credit.py                 # prints a table, writes runs/demo_credit/credit_methods.png
    python recipes/demo_credit.py --out docs/img  # maintainers: replaces the tracked figure of docs/credit.md

No model and no data: one prompt, a group of 6 completions of 12 tokens over a 3-token vocabulary
that share prefixes and part ways at different depths (a prefix tree), verifiable 0/1 rewards.
The picture shows, for each method of the registry, the per-token credit ``C_j``: the factor of
``grad log pi(o_j)`` in the policy gradient at ratio 1 (the forward view), with a token sum as the
aggregation. For the log-ratio styles that is ``C_j = sum_{t >= j} w(t, j) A`` (docs/design.md, section 3); for
the prefix-tree methods it is their per-token advantage. Entropy-80/20 needs the policy's
entropies: the demo uses made-up ones (high where the completions part ways), so that panel shows
the rule, not a model.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from creditlib import DecayStyle  # noqa: E402
from creditlib import functional as F  # noqa: E402
from creditlib.credit import get_credit  # noqa: E402

METHODS = ("grpo", "clamp", "grpo-lambda", "grpo-lambda-norm", "gspo", "prefix-gae", "prefix-gae-lambda",
           "entropy-80-20")


def sample_group():
    """``tokens [G, T]``, ``mask [G, T]``, ``rewards [G]`` of one prompt: a small prefix tree."""
    base = [0, 1, 2, 0, 1, 1, 2, 0, 2, 1, 0, 2]  # T = 12
    branches = [  # (copy the base up to this depth, then this continuation), reward
        ((12, []), 1.0),
        ((7, [1, 1, 0, 2, 2]), 1.0),
        ((7, [0, 2, 1, 1, 0]), 0.0),
        ((3, [2, 2, 0, 1, 0, 0, 1, 2, 1]), 0.0),
        ((3, [2, 2, 0, 1, 2, 1]), 0.0),  # shorter completion: right padding
        ((1, [0, 0, 1, 2, 0, 1, 1, 0, 2, 2, 1]), 1.0),
    ]
    T = len(base)
    tokens = torch.zeros(len(branches), T, dtype=torch.long)  # [G, T]
    mask = torch.zeros(len(branches), T, dtype=torch.bool)  # [G, T]
    rewards = torch.tensor([r for _, r in branches])  # [G]
    for i, ((depth, rest), _) in enumerate(branches):
        seq = base[:depth] + rest
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    return tokens, mask, rewards


def fork_entropy(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Made-up per-token entropies ``[G, T]``: high at the tokens where a completion leaves others."""
    G, T = tokens.shape
    ent = torch.full((G, T), 0.2)  # [G, T]
    for i in range(G):
        for j in range(G):
            if i == j:
                continue
            n = int(min(mask[i].sum(), mask[j].sum()))
            diff = (tokens[i, :n] != tokens[j, :n]).nonzero()
            if len(diff):
                ent[i, int(diff[0])] += 0.5  # the first token where o_i and o_j differ
    ent += 0.05 * torch.linspace(0, 1, T) + 0.01 * torch.arange(G)[:, None] / G  # [G, T] no ties
    return ent * mask


def credit(name: str, tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Per-token credit ``[G, T]`` of the registered method ``name`` (0 on padding)."""
    m = get_credit(name)
    G = tokens.shape[0]
    adv = m.advantages(rewards, mask, tokens=tokens, group_size=G)  # [G] or [G, T], clamp included
    if adv.dim() == 2:  # prefix-tree GAE: already per token
        c = adv
    else:  # log-ratio styles: forward view of the trace (plain ratio: the advantage on every token)
        c = F.traced_credit(adv, mask, m.trace or DecayStyle("recent", lam=0.0))  # [G, T]
    if m.entropy_quantile is not None:
        c = c * m.loss_mask(mask, fork_entropy(tokens, mask))  # [G, T] selected tokens only
    return c * mask


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_credit",
                   help="folder for the PNG figure (default: runs/demo_credit; docs/img replaces the tracked figure "
                        "of docs/credit.md)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tokens, mask, rewards = sample_group()
    credits = {name: credit(name, tokens, mask, rewards) for name in METHODS}  # each [G, T]
    print("completions (a/b/c = tokens 0/1/2; . = padding) and rewards")
    for i in range(tokens.shape[0]):
        s = "".join("abc"[int(t)] if m else "." for t, m in zip(tokens[i], mask[i]))
        print(f"  o{i}  {s}  R={rewards[i]:.0f}")
    print(f"\n{'method':18s} {'first tok o0':>13s} {'last tok o0':>12s} {'row sum o0':>11s} {'row sum o2':>11s}")
    for name, c in credits.items():
        n0 = int(mask[0].sum())
        print(f"{name:18s} {c[0, 0]:13.3f} {c[0, n0 - 1]:12.3f} {c[0].sum():11.3f} {c[2].sum():11.3f}")

    fig, axes = plt.subplots(2, 4, figsize=(15, 6.2), sharey=True)
    for ax, (name, c) in zip(axes.flat, credits.items()):
        vmax = float(c.abs().max()) or 1.0
        shown = c.masked_fill(~mask, float("nan"))  # [G, T] padding blank
        im = ax.imshow(shown.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        for i in range(tokens.shape[0]):
            for j in range(tokens.shape[1]):
                if mask[i, j]:
                    ax.text(j, i, "abc"[int(tokens[i, j])], ha="center", va="center", fontsize=6, color="0.3")
        ax.set_title(f"{name}  (|C| max {vmax:.2f})", fontsize=9)
        ax.set_xlabel("token position")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    for ax in axes[:, 0]:
        ax.set_yticks(range(tokens.shape[0]))
        ax.set_yticklabels([f"o{i} R={rewards[i]:.0f}" for i in range(tokens.shape[0])], fontsize=8)
    fig.suptitle("per-token credit C_j of one group (forward view at ratio 1; blue +, red -; each panel its own scale)",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(args.out, "credit_methods.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
