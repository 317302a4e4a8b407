"""The group prefix-tree TD error: ``naive.py`` (the trie-walk definition) beside ``vectorised.py``
(the fast form, behind the public ``creditlib.functional.prefix_td``); ``tests/test_prefix_td.py``
holds them together."""

from .naive import prefix_td_naive, prefix_values_naive
from .vectorised import prefix_td

__all__ = ["prefix_td", "prefix_td_naive", "prefix_values_naive"]
