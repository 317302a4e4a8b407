"""The embedded verifiable task: a walk on a 10-digit dial, written step by step, and its tokenizer.

A problem is a start digit followed by ``num_ops`` moves, ``+`` (one step clockwise, +1 mod 10) or
``-`` (one step back, -1 mod 10). The solution writes the position after every move, then the
final answer::

    prompt      7++-+++-?
    completion  8989010=0          (7+1=8, 8+1=9, 9-1=8, 8+1=9, 9+1=0, 0+1=1, 1-1=0; answer: the last position)

The answer depends on every earlier step, so a model that skips or botches one step is wrong: the
reward (1 if the digit after the last ``=`` is right) is verifiable and sparse, and credit has to
flow back to the early tokens that caused a wrong answer. (Steps such as ``(r + a) mod 10`` with a
random digit ``a`` are much harder to learn for a small model: their result is uncorrelated with
either input alone, so gradient descent sits on a plateau; a +/-1 walk keeps each step local.)

Problems are generated from ``(data_seed, split, index)`` alone, so the data position is a single
integer and the held-out splits (``"test"``, ``"val"``) are disjoint from the training stream by
construction (training problems that happen to equal a held-out prompt are skipped).

The tokenizer is character level, built offline with the ``tokenizers`` library and wrapped as a
``transformers.PreTrainedTokenizerFast`` (``<bos>`` is prepended to every encoded text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

__all__ = ["ChainTask", "build_char_tokenizer", "chain_reward", "extract_chain_answer", "CHAR_VOCAB"]

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAR_VOCAB = SPECIALS + list("0123456789") + list("+-?=")
_MOVES = {"+": 1, "-": -1}


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` for the chain task (no download needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    fast.model_max_length = 4096
    return fast


def extract_chain_answer(completion: str) -> Optional[str]:
    """The text after the last ``=`` (stripped), or ``None`` when there is no ``=``."""
    if "=" not in completion:
        return None
    return completion.rsplit("=", 1)[1].strip()


def chain_reward(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 where the final answer (after the last ``=``) equals the reference, else 0.0."""
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers must have the same length, got {len(completions)} and {len(answers)}")
    return [1.0 if extract_chain_answer(c) == str(a) else 0.0 for c, a in zip(completions, answers)]


@dataclass(frozen=True)
class ChainProblem:
    prompt: str      # "7++-+++-?"
    solution: str    # "8989010=0"
    answer: str      # "0"


class ChainTask:
    """Generator of dial-walk problems (see the module docstring).

    Args:
        num_ops: moves per walk (>= 1); completions are ``num_ops + 2`` characters + EOS.
        data_seed: seed of the generator; with the split name and the index it fixes a problem.
        heldout_sizes: sizes of the held-out splits excluded from training, e.g. ``{"test": 512, "val": 256}``.
    """

    def __init__(self, num_ops: int = 10, data_seed: int = 1234, heldout_sizes: Optional[dict] = None):
        if not isinstance(num_ops, int) or num_ops < 1:
            raise ValueError(f"num_ops must be a positive int, got {num_ops!r}")
        self.num_ops = num_ops
        self.data_seed = int(data_seed)
        self.heldout_sizes = dict(heldout_sizes or {"test": 512, "val": 256})
        if sum(self.heldout_sizes.values()) > 10 * 2 ** num_ops // 2:
            raise ValueError(f"held-out splits {self.heldout_sizes} need more than half of the {10 * 2 ** num_ops} "
                             f"distinct problems with num_ops={num_ops}; use more moves or smaller splits")
        self._heldout, self._excluded = {}, set()
        for name, n in self.heldout_sizes.items():  # splits are disjoint from each other, in order
            self._heldout[name] = self._distinct(name, n, exclude=self._excluded)
            self._excluded |= {p.prompt for p in self._heldout[name]}

    @property
    def completion_length(self) -> int:
        """Tokens of a full solution including the EOS token."""
        return self.num_ops + 3

    def problem(self, split: str, index: int) -> ChainProblem:
        rng = random.Random(f"{self.data_seed}:{split}:{index}")
        r = rng.randrange(10)
        prompt, steps = [str(r)], []
        for _ in range(self.num_ops):
            op = rng.choice("+-")
            r = (r + _MOVES[op]) % 10
            prompt.append(op)
            steps.append(str(r))
        return ChainProblem("".join(prompt) + "?", "".join(steps) + f"={r}", str(r))

    def _distinct(self, split: str, n: int, exclude: set) -> List[ChainProblem]:
        out, seen, i = [], set(exclude), 0
        while len(out) < n:
            p = self.problem(split, i)
            i += 1
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        return out

    def heldout(self, split: str = "test", n: Optional[int] = None) -> List[ChainProblem]:
        """The first ``n`` problems of a held-out split (never seen in training)."""
        if split not in self._heldout:
            raise ValueError(f"split must be one of {sorted(self._heldout)}, got {split!r}")
        probs = self._heldout[split]
        return probs if n is None else probs[:n]

    def train(self, start: int, count: int) -> Tuple[List[ChainProblem], int]:
        """``count`` training problems from stream position ``start``; returns them and the next position."""
        out, i = [], start
        while len(out) < count:
            p = self.problem("train", i)
            i += 1
            if p.prompt not in self._excluded:
                out.append(p)
        return out, i

    def iter_train(self, start: int = 0) -> Iterator[ChainProblem]:
        i = start
        while True:
            (p,), i = self.train(i, 1)
            yield p
