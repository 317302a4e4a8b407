"""One real tree rollout on the bundled task, and the credit each of its tokens gets (docs/trees.md).

    python recipes/demo_tree.py                 # prints the tree, writes runs/demo_tree/tree_example.png
    python recipes/demo_tree.py --out docs/img  # maintainers: replaces the tracked figure of docs/trees.md

The recipe's policy (the embedded tiny Qwen2 and character tokenizer, ``creditlib.rl.build``) on
the bundled dial walk (``RecipeConfig()``: ``num_ops=10``, 13-token completions), after a short
supervised warm-up on worked solutions, so that it is right on some walks and unsure where a walk
is hard. Then one tree, ``TreeSpec()`` (2 roots, each forked once at its highest-entropy token
into 3 branches: 8 leaves), through :class:`creditlib.rl.tree.TransformersBackend`, for the first
held-out prompt whose 8 leaves get both rewards (a group with one outcome gets no credit at all).

The picture, leaves as rows aligned by token position (roots followed by their children):

* the tokens, the copied (shared) prefix of each child greyed, the fork point of each child boxed
  and marked on its parent (the parent's token there was re-sampled);
* the sampling entropy of each token (what ``select="entropy"`` ranks);
* the credit each token gets under ``prefix-gae`` (``gamma = lam = 1``, group-std scale) and under
  TreeRL's global-plus-local rule (``creditlib.functional.treerl_advantage``).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from creditlib.credit import get_credit  # noqa: E402
from creditlib.rl.build import build_policy  # noqa: E402
from creditlib.rl.config import RecipeConfig  # noqa: E402
from creditlib.rl.data import build_source  # noqa: E402
from creditlib.rl.rewards import reward_for_dataset  # noqa: E402
from creditlib.rl.tree import TransformersBackend, TreeSpec, sample_tree  # noqa: E402
from creditlib.functional import treerl_advantage  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_tree",
                   help="folder for tree_example.png (default: runs/demo_tree; docs/img replaces the tracked figure "
                        "of docs/trees.md)")
    p.add_argument("--sft-steps", type=int, default=40, help="supervised warm-up steps (default 40: right on some walks, unsure on others)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the warm-up and the tree (default 0)")
    p.add_argument("--max-prompts", type=int, default=64,
                   help="held-out prompts to try for a tree with both rewards (default 64)")
    args = p.parse_args(argv)
    for name in ("sft_steps", "max_prompts"):
        if getattr(args, name) < (0 if name == "sft_steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'sft_steps' else 1}")
    if not args.temperature > 0:
        p.error("--temperature must be > 0")
    return args


def warm_up(model, source, cfg, steps: int) -> float:
    """``steps`` AdamW steps of cross-entropy on worked solutions (as the recipe's warm-up, without
    its validation stop). Returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    model.train()
    pos, loss = 0, float("nan")
    for _ in range(steps):
        exs, pos = source.next_batch(pos, cfg.sft_batch_size)
        ids, attn, labels = source.encode_sft(exs)  # [b, L] each
        out = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = float(out.loss.detach())
    return loss


def dfs_order(parent: torch.Tensor) -> list:
    """Rows of one group with every row followed by its children (depth first)."""
    kids = {i: [] for i in range(-1, parent.numel())}
    for i, p in enumerate(parent.tolist()):
        kids[p].append(i)
    out, stack = [], list(reversed(kids[-1]))
    while stack:
        i = stack.pop()
        out.append(i)
        stack.extend(reversed(kids[i]))
    return out


def draw(path, tokens, mask, fork, parent, rewards, entropies, credits, tok):
    """The figure: tokens / entropy / one heatmap per credit rule, rows = leaves, columns = positions."""
    G, T = tokens.shape
    chars = [[tok.convert_ids_to_tokens(int(t)) if m else "" for t, m in zip(tokens[i], mask[i])] for i in range(G)]
    chars = [[("EOS" if c == tok.eos_token else c) for c in row] for row in chars]
    panels = [("tokens (grey: copied from the parent; box: fork point, re-sampled; ▼ on the parent)", None),
              ("sampling entropy (nats)", entropies)] + list(credits.items())
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), sharex=True)
    labels = [f"leaf {i}" + (f" ← {int(parent[i])} @{int(fork[i])}" if parent[i] >= 0 else " (root)")
              + f"  R={rewards[i]:.0f}" for i in range(G)]
    for ax, (title, values) in zip(axes, panels):
        if values is None:
            shown = torch.where(mask, torch.where(torch.arange(T)[None, :] < fork[:, None], 0.35, 0.0),
                                torch.tensor(float("nan")))  # [G, T]
            ax.imshow(shown.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto")
        else:
            v = values.masked_fill(~mask, float("nan"))  # [G, T]
            if values is entropies:
                im = ax.imshow(v.numpy(), cmap="viridis", vmin=0, aspect="auto")
            else:
                vmax = float(values.abs().max()) or 1.0
                im = ax.imshow(v.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        for i in range(G):
            for j in range(T):
                if mask[i, j]:
                    shared = j < int(fork[i])
                    ax.text(j, i, chars[i][j], ha="center", va="center", fontsize=8,
                            color="0.55" if shared else "black", fontweight="normal" if shared else "bold")
            if parent[i] >= 0:
                k, p = int(fork[i]), int(parent[i])
                ax.add_patch(Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="crimson", lw=1.8))
                ax.plot([k], [p - 0.32], marker="v", color="crimson", ms=5)
        ax.set_yticks(range(G))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("token position in the completion")
    axes[-1].set_xticks(range(T))
    fig.suptitle("one tree of the bundled task (TreeSpec(): 2 roots x 1 entropy fork x 3 branches); "
                 "credit: blue +, red -, each panel its own scale", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    args = parse_args(argv)
    cfg = RecipeConfig()
    torch.manual_seed(args.seed)
    model, tok = build_policy(cfg, torch.device("cpu"))
    source = build_source(cfg, tok)
    reward = reward_for_dataset(cfg.dataset)
    loss = warm_up(model, source, cfg, args.sft_steps)
    print(f"warm-up: {args.sft_steps} steps of {cfg.sft_batch_size} worked solutions, last loss {loss:.3f}")
    backend = TransformersBackend(model, tok, temperature=args.temperature)
    spec = TreeSpec()
    T = source.max_new_tokens
    heldout = source.heldout(args.max_prompts)
    for n, ex in enumerate(heldout):
        ids, pmask = source.encode([ex])  # [1, P]
        tree = sample_tree(backend, ids, pmask, spec, max_new_tokens=T, seed=args.seed, tokenizer=tok,
                           group_size=spec.leaves)
        rewards = torch.tensor(reward(tree.texts, [ex.answer] * tree.batch_size), dtype=torch.float32)  # [8]
        if 0 < float(rewards.sum()) < tree.batch_size:
            break
    else:
        print(f"none of the first {len(heldout)} held-out prompts gave a tree with both rewards; "
              "try another --seed or more --sft-steps", file=sys.stderr)
        raise SystemExit(1)
    mask = tree.completion_mask  # [8, T]
    pg = get_credit("prefix-gae").advantages(rewards, mask, tokens=tree.completion_ids, group_size=spec.leaves)  # [8, T]
    trl = treerl_advantage(tree.completion_ids, mask, rewards, spec.leaves)  # [8, T]
    order = dfs_order(tree.parent)
    pos_of = {r: i for i, r in enumerate(order)}
    idx = torch.tensor(order)
    parent = torch.tensor([pos_of[int(p)] if p >= 0 else -1 for p in tree.parent[idx].tolist()])  # [8] in display order
    print(f"prompt {ex.prompt!r} (held-out #{n}), answer {ex.answer}; {tree.summary()}")
    for i, r in enumerate(order):
        how = f"fork of leaf {int(parent[i])} at {int(tree.fork_pos[r])}" if parent[i] >= 0 else "root"
        print(f"  leaf {i}: {tree.texts[r]:<14s} R={rewards[r]:.0f}  ({how})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tree_example.png")
    draw(path, tree.completion_ids[idx], mask[idx], tree.fork_pos[idx], parent, rewards[idx], tree.entropies[idx],
         {"prefix-gae (gamma = lam = 1): (R_i - V(prefix)) / std, V = mean reward of the other leaves through "
          "the prefix": pg[idx],
          "TreeRL: ((U(k) - U_root) + (U(k) - U_parent(k))) / sqrt(leaves below)": trl[idx]}, tok)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
