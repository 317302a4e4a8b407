"""The learning study's own code, kept out of the library (issue 10, section 2; issue 12).

* :mod:`study.plan` -- tasks, credit methods, lr grid and seeds (``Plan``), the run-folder layout and
  the selection state read back from it;
* :mod:`study.sweep` -- runs the plan: recipe subprocesses, lr selection with grid extension, resume,
  ``--code-snapshot``, the runner's child mode;
* :mod:`study.report` -- the analysis of the run folders and the results page (``--report``);
* :mod:`study.stats` -- statistics and plots over many recipe runs (steps to threshold, bootstrap
  intervals, collapse, the per-method learning-rate selection, tables, PNGs: curves, steps bars,
  forest plot, lr sensitivity);
* :mod:`study.tasks` -- the study's tasks (``walk``, ``early``, ``late``, ``long``), added to the
  recipes with ONE registry call each, all made by :func:`study.tasks.register_tasks`
  (``creditlib.rl.registry``); their held-out split follows ``STUDY_EVAL_SPLIT`` (test | val).

The command line is ``benchmarks/learning_study.py`` (a thin CLI over plan / sweep / report); it puts
``benchmarks/`` on ``sys.path``, so these modules import as ``study.plan``, ``study.stats`` and so on.
"""
