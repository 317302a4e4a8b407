"""The learning study's own code, kept out of the library (issue 10, section 2; issue 12).

* :mod:`study.stats` -- statistics and plots over many recipe runs (steps to threshold, bootstrap
  intervals, collapse, the per-method learning-rate selection, tables, PNGs: curves, steps bars,
  forest plot, lr sensitivity);
* :mod:`study.tasks` -- the study's tasks (``walk``, ``early``, ``late``, ``long``), added to the
  recipes with ONE registry call each, all made by :func:`study.tasks.register_tasks`
  (``creditlib.rl.registry``); their held-out split follows ``STUDY_EVAL_SPLIT`` (test | val).

The runner is ``benchmarks/learning_study.py``; it puts ``benchmarks/`` on ``sys.path``, so these
modules import as ``study.stats`` and ``study.tasks``.
"""
