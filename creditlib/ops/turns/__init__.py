"""Turn and step credit for agents (issue 17): ``naive.py`` (the plain loops, per row and turn,
float64) beside ``vectorised.py`` (the fast form, behind ``creditlib.functional.turn_credit`` and
its helpers); ``_check.py`` holds the input checks; ``tests/test_turn_credit.py`` holds the two
together."""

from .naive import (implicit_process_rewards_naive, turn_credit_naive, turn_ends_naive, turn_ids_from_mask_naive,
                    turn_returns_naive)
from .vectorised import KINDS, implicit_process_rewards, turn_credit, turn_ends, turn_ids_from_mask, turn_returns

__all__ = ["KINDS", "turn_ids_from_mask", "turn_ends", "turn_returns", "turn_credit", "implicit_process_rewards",
           "turn_ids_from_mask_naive", "turn_ends_naive", "turn_returns_naive", "turn_credit_naive",
           "implicit_process_rewards_naive"]
