"""``qfl sweep``: every fixed (n, m, I) of a grid and each asked-for policy, on the same seeds, data, board and link.

Modules: ``grid`` (parse and check the grid and policy options), ``runner``
(run the settings, resumably, into ``--out``), ``result`` (hindsight best,
regret and saving: the ``--json`` object), ``cli`` (the command).
"""
