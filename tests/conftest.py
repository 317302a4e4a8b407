"""Shared test setup: offline hubs, deterministic seeds, one thread (CI has 2 cores), and the fast lane.

The fast lane is ``pytest -m "not slow" tests``: every test that starts another Python process (a
recipe under torchrun, a fresh interpreter, the Triton interpreter worker), builds the C++ kernel
or builds/installs a package carries ``@pytest.mark.slow``. Files of their own mark it in place;
``SLOW_TESTS`` below marks the remaining ones by node id (file and test name, any parametrization),
and ``test_docs_fast_lane.py`` checks that every name listed there still exists.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# file -> test functions that start a process or build the kernel (see the module docstring)
SLOW_TESTS = {
    "test_credit.py": ("test_credit_module_imports_torch_only",),                     # fresh interpreter
    "test_eval_evaluator.py": ("test_cli_help_oracle_and_tiny_model",),               # recipe --help process
    "test_functional.py": ("test_two_to_the_twenty_tokens_in_bounded_memory",),       # fresh interpreter
    "test_gpu_check.py": ("test_gpu_check_cpu_smoke",),                               # benchmarks/gpu_check.py
    "test_integration_trl.py": ("test_prefix_gae_with_groups_spanning_two_processes",),  # 2 processes
    "test_integration_verl.py": ("test_verl_loads_the_module_in_a_fresh_process",),   # fresh interpreter
    "test_kernel_build.py": ("test_avx512_guard_needs_f_bw_vl_not_vbmi",              # compiles
                             "test_broken_compiler_auto_falls_back_with_one_warning_and_cpp_raises",
                             "test_small_inputs_never_build_and_log_the_choice_once",
                             "test_killed_build_leaves_no_hang",
                             "test_build_command_check_on_an_empty_cache"),
    "test_kernel_cpu.py": ("test_cache_loads_in_a_new_process_without_building",),    # fresh interpreter
    "test_kernel_triton.py": ("test_triton_kernel_matches_reference",),               # interpreter worker
    "test_study3.py": ("test_tiny_sweep_independent_warmups_selection_report",),  # recipe processes
    "test_study3_checkpoints.py": ("test_shipped_warmup_evaluates_to_its_recorded_accuracy",),  # recipe processes
    "test_recipes.py": ("test_resume_after_sigkill_matches_uninterrupted_run",        # recipe processes
                        "test_sigterm_checkpoints_the_current_step_and_exits",
                        "test_torchrun_two_processes_fsdp2_gloo"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = SLOW_TESTS.get(item.path.name, ())
        if getattr(item, "originalname", item.name) in names and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def available_backends():
    """Trace backends that run on this machine's CPU: always "torch"; "cpp" when it can build."""
    out = ["torch"]
    try:
        from creditlib.ops.trace import build

        if build.can_build():
            out.append("cpp")
    except Exception:  # pragma: no cover - a broken toolchain is reported by test_kernel_cpu
        pass
    return out
