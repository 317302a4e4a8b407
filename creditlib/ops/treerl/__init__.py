"""TreeRL's per-token advantage on a group's prefix tree: ``naive.py`` (the brute-force definition)
beside ``vectorised.py`` (the fast form, registered as the credit method ``treerl`` and exported as
``creditlib.functional.treerl_advantage``); ``tests/test_tree_credit.py`` holds them together."""

from .naive import treerl_advantage_reference
from .vectorised import treerl_advantage

__all__ = ["treerl_advantage", "treerl_advantage_reference"]
