"""Experiments: drivers built on the library, each making runs and tables from a plan.

``demo`` (``collapsediag demo``: the small study on the embedded model), ``longstudy`` and ``studyreport``
(``collapsediag study``: the long study and its findings), ``sweep`` (a grid of runs from a TOML spec) and
``alone`` (each edit made alone on the unedited model: the ground truth the cheap flags are scored against).
May import everything but ``cli``.
"""
