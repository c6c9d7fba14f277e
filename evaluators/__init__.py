"""Evaluators: model -> {metric: float}. Installed as ``evomerge.evaluators``.

Each evaluator is chosen by ``name`` in the job config (see :mod:`evomerge.registries`) and
built with :func:`evomerge.evaluators.base.build_evaluator`.
"""
