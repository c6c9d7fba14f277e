"""The search: the driver process, which alone talks to the Optuna study, and its Ray workers.

``driver`` checks the job (``preflight``), opens the study (``study``, ``storage``) and runs the
ask/tell ``loop`` over a ``pool`` of ``worker`` actors, each mapping Recipe -> metrics; the
``samplers`` (``cma_restarts``), ``objectives``, ``fidelity`` rungs, ``progress`` events and the
post-search phases (``references``, ``heldout``) serve that loop; ``ray_cluster`` starts Ray and
cleans up after it. ``adamerging`` is the gradient optimizer beside the sampled search.
Importing this package imports no submodule.
"""
