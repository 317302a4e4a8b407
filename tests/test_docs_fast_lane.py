"""The fast lane (``pytest -m "not slow"``): the node ids that tests/conftest.py marks slow still exist.

A renamed test would otherwise silently move back into the fast lane. The check parses the test
files (no import, no collection), so it is instant.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import SLOW_TESTS, pytest_collection_modifyitems

TESTS = Path(__file__).resolve().parent


def _test_functions(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test")}


@pytest.mark.parametrize("filename", sorted(SLOW_TESTS))
def test_every_slow_node_id_names_an_existing_test(filename):
    path = TESTS / filename
    assert path.is_file(), f"tests/conftest.py SLOW_TESTS names {filename}, which does not exist"
    missing = sorted(set(SLOW_TESTS[filename]) - _test_functions(path))
    assert not missing, f"tests/conftest.py SLOW_TESTS names tests that {filename} no longer has: {missing}"


class _Item:
    """The two attributes of a pytest item that the hook reads, and its markers."""

    def __init__(self, path, name, marks=()):
        self.path, self.originalname, self.name, self.marks = Path(path), name, name + "[x]", list(marks)

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def add_marker(self, mark):
        self.marks.append(mark.mark if hasattr(mark, "mark") else mark)


def test_hook_marks_listed_tests_only_and_once():
    listed = _Item(TESTS / "test_recipes.py", "test_torchrun_two_processes_fsdp2_gloo")
    already = _Item(TESTS / "test_recipes.py", "test_torchrun_two_processes_fsdp2_gloo", [pytest.mark.slow.mark])
    other = _Item(TESTS / "test_recipes.py", "test_some_unit_test")
    same_name_elsewhere = _Item(TESTS / "test_losses.py", "test_torchrun_two_processes_fsdp2_gloo")
    pytest_collection_modifyitems(None, [listed, already, other, same_name_elsewhere])
    assert [m.name for m in listed.marks] == ["slow"]
    assert [m.name for m in already.marks] == ["slow"]
    assert other.marks == [] and same_name_elsewhere.marks == []
