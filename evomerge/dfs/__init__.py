"""Data-flow-space (DFS) merging, DESIGN.md section 4: a path of decoder layers through models.

- :mod:`evomerge.dfs.sources`: load the source models once (folders, hub ids, inline ps
  recipes) and check that their layers can be chained (one architecture, one hidden size).
- :mod:`evomerge.dfs.path_model`: build the model a path describes out of the loaded layers
  (wrappers only, no weight copies).
- :mod:`evomerge.dfs.engine`: :class:`~evomerge.dfs.engine.DFSEngine`, the ``dfs`` engine.
- :mod:`evomerge.dfs.export`: write a path as a plain model of the same architecture (stock
  transformers loads it); :mod:`evomerge.dfs.passthrough`: the same as a mergekit YAML.
- :mod:`evomerge.dfs.card`: the path drawn as text for the model card.
"""
