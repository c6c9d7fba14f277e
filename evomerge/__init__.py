"""evomerge: search model-merge recipes with Optuna samplers and Ray workers.

Importing this package is cheap: torch, ray, transformers and lm_eval are imported only by the
modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
