"""creditlib's operators, laid out like flash-linear-attention's ``ops/<op>/``: each op's plain
definition (``naive``: slow, obviously right, the ground truth) beside its fast forms, and the
tests that hold the fast forms to the definition.

``trace/`` -- the eligibility trace ``z = W x`` (and ``W^T x``):
    ``naive.py``         the dense ``[T, T]`` definition (``trace_weights``, ``eligibility_trace_naive``);
    ``torch_scan.py``    pure-PyTorch blocked scan (no compiler);
    ``cpu.py``           the fused C++ kernel's wrapper, ``csrc/trace_cpu.cpp`` the kernel,
                         ``build.py`` its JIT build system (cache, lock, ISA choice);
    ``triton_kernel.py`` the Triton kernel (CUDA);
    ``__init__.py``      the dispatcher (``trace_scan``, ``backend="auto"``), the ``Schedule``
                         and the non-finite rule every backend follows.
    Tests: ``test_kernel_cpu.py``, ``test_torch_scan_paths.py``, ``test_kernel_triton.py``,
    ``test_kernel_nonfinite.py``, ``test_trace_robustness.py``, ``test_functional.py``;
    the build: ``test_kernel_build.py``, ``test_packaging.py``.

``prefix/`` -- the group prefix-tree TD error (``prefix_td``):
    ``naive.py``         the trie-walk definition (``prefix_td_naive``, ``prefix_values_naive``);
    ``vectorised.py``    the vectorised form (no Python loop over tokens, rows or groups).
    Tests: ``test_prefix_td.py``.

``treerl/`` -- TreeRL's global-plus-local advantage on a prefix tree (``treerl_advantage``):
    ``naive.py``         the brute-force definition (``treerl_advantage_reference``);
    ``vectorised.py``    the vectorised form. Tests: ``test_tree_credit.py``.

``turns/`` -- turn and step credit for agents (``turn_credit``: turn-grpo, turn-index, anchor-state,
    prefix-turn; ``turn_ids_from_mask``, ``turn_returns``, ``implicit_process_rewards``):
    ``naive.py``         plain loops over rows and turns (the definitions);
    ``vectorised.py``    segment sums and one gather (no Python loop over tokens, rows or groups);
    ``_check.py``        the one place their inputs are validated. Tests: ``test_turn_credit.py``.

``entropy.py`` -- the entropy-selected tokens (``entropy_mask``) and their definition
    (``entropy_mask_naive``). Tests: ``test_entropy_mask.py``.

The public entry points are in :mod:`creditlib.functional`; everything here is private.
"""
