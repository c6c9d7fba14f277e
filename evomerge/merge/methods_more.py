"""The merge methods beyond task arithmetic: mergekit 0.1.5's geometric and selective methods,
and two data-free SVD methods of 2025 that mergekit does not have.

Each is one :class:`~evomerge.merge.methods_spec.MethodSpec` with mergekit's name, parameters and
defaults (read from mergekit 0.1.5's ``merge_methods/``). None has a fused Workspace path
(``family=None``): the Workspace runs the reference kernel
(:mod:`evomerge.merge.merge_methods_more`, :mod:`evomerge.merge.merge_methods_svd`) on the
models' tensors rebuilt from their task vectors.

- ``model_stock`` (base + at least two models; flag ``filter_wise``), ``nuslerp`` (exactly two
  models, optional base: with one it interpolates the task vectors; flags ``nuslerp_flatten``,
  ``nuslerp_row_wise``), ``multislerp`` (any number, optional base; ``normalize_weights``,
  ``eps``), ``karcher`` (no base; ``max_iter``, ``tol``), ``nearswap`` (base + one model;
  ``t``), ``arcee_fusion`` (base + one model), ``ram`` (``epsilon``) and ``ramplus_tl`` (``r``,
  ``alpha``, ``epsilon``), the two Reinforced Agent Merging variants.
- ``tsv_m`` (Task Singular Vectors: Merge, Gargiulo et al., CVPR 2025), ``iso_c`` and ``iso_cts``
  (isotropic merging, Marczak et al., ICML 2025): ``lambda`` scales the merged task vector, as
  task arithmetic's does; ``iso_cts`` adds ``common_space_fraction``. evomerge-only
  (``mergekit=None``: a mergekit export is refused, ``--format hf`` and ``recipe`` work).

Numerical settings (``eps``, ``tol``, ``max_iter``) have a one-point search range: they are
recipe parameters (exported to mergekit) but not searched unless ``search.space.bounds`` says so.
mergekit's ``nuslerp`` and ``multislerp`` take an optional base; the search space merges them
without one (``needs_base=False``), a recipe may name one.

>>> METHODS["nuslerp"].flags
{'nuslerp_row_wise': False, 'nuslerp_flatten': True}
>>> METHODS["iso_cts"].global_params["common_space_fraction"].default
0.8
"""

from __future__ import annotations

import math
from dataclasses import replace

from evomerge.merge.methods_spec import (
    LAMBDA,
    METHODS,
    WEIGHT,
    MethodSpec,
    ParamSpec,
    T,
    register_method,
)

MORE = "evomerge.merge.merge_methods_more"
SVD = "evomerge.merge.merge_methods_svd"
POSITIVE = (0.0, math.inf, False, False)
NON_NEGATIVE = (0.0, math.inf, True, False)


def shared(key: str, param: ParamSpec) -> ParamSpec:
    """``param`` with the valid range and short name that registered methods already give
    ``key`` (mergekit reuses ``epsilon`` in ``della`` and ``ram``; the registry wants one)."""
    for spec in METHODS.specs():
        for table in (spec.model_params, spec.global_params):
            if key in table:
                return replace(param, valid=table[key].valid, short=table[key].short)
    return param


def fixed(value: float, valid: tuple[float, float, bool, bool]) -> ParamSpec:
    """A numerical setting: default ``value``, searched only when bounds are given."""
    return ParamSpec(value, value, value, valid=valid)


NEARSWAP_T = replace(T, default=0.001, low=0.0, high=0.01)
"""nearswap's ``t`` is a distance in weight units (entries closer than ``t`` are swapped), not a
fraction; mergekit requires it, typical values are 1e-4 to 1e-2."""
EPSILON = shared("epsilon", ParamSpec(1e-5, 1e-6, 1e-3, valid=NON_NEGATIVE))

for _spec in (
    MethodSpec("model_stock", kernel=f"{MORE}:model_stock", needs_base=True,
               flags={"filter_wise": False}, mergekit="model_stock"),
    MethodSpec("nuslerp", kernel=f"{MORE}:nuslerp", needs_base=False,
               model_params={"weight": WEIGHT},
               flags={"nuslerp_row_wise": False, "nuslerp_flatten": True}, max_models=2,
               mergekit="nuslerp"),
    MethodSpec("multislerp", kernel=f"{MORE}:multislerp", needs_base=False,
               model_params={"weight": WEIGHT}, global_params={"eps": fixed(1e-8, POSITIVE)},
               flags={"normalize_weights": True}, mergekit="multislerp"),
    MethodSpec("karcher", kernel=f"{MORE}:karcher", needs_base=False,
               global_params={"max_iter": fixed(10, (1.0, math.inf, True, False)),
                              "tol": fixed(1e-5, POSITIVE)}, mergekit="karcher"),
    MethodSpec("nearswap", kernel=f"{MORE}:nearswap", needs_base=True,
               global_params={"t": NEARSWAP_T}, max_models=1, mergekit="nearswap"),
    MethodSpec("arcee_fusion", kernel=f"{MORE}:arcee_fusion", needs_base=True, max_models=1,
               mergekit="arcee_fusion"),
    MethodSpec("ram", kernel=f"{MORE}:ram", needs_base=True, global_params={"epsilon": EPSILON},
               mergekit="ram"),
    MethodSpec("ramplus_tl", kernel=f"{MORE}:ramplus_tl", needs_base=True,
               global_params={"r": ParamSpec(0.1, 0.0, 1.0, valid=NON_NEGATIVE),
                              "alpha": ParamSpec(0.2, 0.0, 1.0, valid=NON_NEGATIVE),
                              "epsilon": EPSILON}, mergekit="ramplus_tl"),
    MethodSpec("tsv_m", kernel=f"{SVD}:tsv_m", needs_base=True, global_params={"lambda": LAMBDA}),
    MethodSpec("iso_c", kernel=f"{SVD}:iso_c", needs_base=True, global_params={"lambda": LAMBDA}),
    MethodSpec("iso_cts", kernel=f"{SVD}:iso_cts", needs_base=True,
               global_params={"lambda": LAMBDA, "common_space_fraction": ParamSpec(
                   0.8, 0.5, 0.95, valid=(0.0, 1.0, True, True))}),
):
    register_method(_spec)
