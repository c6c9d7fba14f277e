"""The PS engine: a Recipe applied to the models' weights, in a worker (or by ``evomerge merge``).

``methods_spec`` declares each merge method once (parameters, defaults, kernel); its kernels are
pure functions on tensors (``merge_methods``, ``trimming``, ``coefficients``). ``reference`` is
the plain whole-state-dict merge every fast path is tested against; ``workspace`` loads the base
and task vectors once (``loading``) and writes each candidate into one live model with fused
``kernels`` and the ``merge_cache`` caches. Importing this package imports no submodule.
"""
