"""Analyses of trained runs and of the quality benchmark's work folders, behind ``smml analyze <what>``.

Each module answers one question and has the same shape: functions that compute a table (tested on
their own), ``add_arguments`` for its command line and ``run`` that prints the table.

- :mod:`.runs`: the shared loader: a run folder's model with its last weights, the benchmark's split
  and test cases, voxel counts and Dice from them.
- :mod:`.agreement`, :mod:`.volumes`, :mod:`.et_breakdown`, :mod:`.loss_terms`, :mod:`.branches`,
  :mod:`.priors`, :mod:`.widths`: the analyses (``smml analyze --help`` lists them).
- :mod:`.timing` and :mod:`.results`: what the benchmark scripts in ``benchmarks/`` share with them:
  interleaved timing, the CPU's description, and the current-result folder with its provenance.

Nothing in ``models``, ``losses``, ``evaluation`` or ``data`` imports this package.
"""
