"""Demo of creditlib's primitives: the trace weights of each style and the credit they give a sample.

    python recipes/demo_trace.py                 # prints a table, writes runs/demo/*.png
    python recipes/demo_trace.py --out docs/img  # regenerates the figures of docs/trace.md

It needs no model and no data: one group of 4 completions with verifiable rewards, the GRPO
advantage, the negative clamp, then the per-token credit under each decay style (forward view).
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

STYLES = {
    "GRPO (recent, lam=0)": DecayStyle("recent", lam=0.0),
    "recent, lam=0.9": DecayStyle("recent", lam=0.9),
    "both, lam=0.9": DecayStyle("both", lam=0.9),
    "recent, lam=0.9, eps=0.2": DecayStyle("recent", lam=0.9, eps=0.2),
    "both, lam=0.9, eps=0.2": DecayStyle("both", lam=0.9, eps=0.2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the PNG figures (default: runs/demo)")
    p.add_argument("--T", type=int, default=24, help="tokens per completion in the example (default: 24)")
    p.add_argument("--clamp-min", type=float, default=-0.1, help="negative-advantage floor (default: -0.1)")
    return p.parse_args(argv)


def heatmaps(out: str, T: int = 24) -> str:
    """Heatmaps of w(t, j) for the weight styles (docs/trace.md)."""
    names = list(STYLES)[1:]
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4))
    for ax, name in zip(axes, names):
        W = F.trace_weights(T, STYLES[name])  # [T, T]
        ax.imshow(W.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("earlier token j")
        ax.set_ylabel("token t")
    fig.suptitle("eligibility-trace weights w(t, j)  (z_t = sum_j w(t, j) x_j)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "trace_weights.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.T < 2:
        raise SystemExit(f"--T must be >= 2, got {args.T}")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    G, T = 4, args.T
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # [G] verifier: right / wrong
    lens = torch.tensor([T, T - 6, T - 2, T - 10])  # [G] completion lengths
    mask = torch.arange(T)[None, :] < lens[:, None]  # [G, T] right padding
    adv = F.group_advantage(rewards, G).clamp_min(args.clamp_min)  # [G]
    print(f"rewards    {rewards.tolist()}")
    print(f"advantages {[round(a, 3) for a in adv.tolist()]}  (group-relative, clamped at {args.clamp_min})\n")

    credits = {name: F.traced_credit(adv, mask, s) for name, s in STYLES.items()}  # each [G, T]
    print(f"{'style':28s} {'credit(first tok)':>18s} {'credit(mid tok)':>16s} {'credit(last tok)':>17s}   (completion 0)")
    for name, c in credits.items():
        n = int(lens[0])
        print(f"{name:28s} {c[0, 0]:18.3f} {c[0, n // 2]:16.3f} {c[0, n - 1]:17.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, c in credits.items():
        axes[0].plot(c[0, : int(lens[0])].numpy(), label=name)
        axes[1].plot(c[1, : int(lens[1])].numpy(), label=name)
    axes[0].set_title(f"completion 0 (reward 1, A = {adv[0]:.2f})")
    axes[1].set_title(f"completion 1 (reward 0, A = {adv[1]:.2f}, clamped)")
    for ax in axes:
        ax.set_xlabel("token position")
        ax.set_ylabel("per-token credit (forward view)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p1 = os.path.join(args.out, "traced_credit.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    p2 = heatmaps(args.out)
    print(f"\nwrote {p1}\nwrote {p2}")


if __name__ == "__main__":
    main()
