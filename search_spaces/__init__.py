"""Search spaces: Optuna trial parameters <-> Recipe. Installed as ``evomerge.search_spaces``."""
