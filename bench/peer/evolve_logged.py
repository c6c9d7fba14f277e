"""Run mergekit-evolve (0.1.5) on CPU through the shared shim and log every candidate.

Run with the peer virtual environment's Python and the shim folder on ``PYTHONPATH`` (its
``sitecustomize.py`` patches lm-eval/mergekit for a CPU-only machine; see
``shared/peers/mergekit-evolve-cpu/README.md``). Same as the shim's ``evolve_cpu.py`` (a local
Ray that advertises ``MK_FAKE_GPUS`` logical GPUs), plus: every evaluated genotype is appended
to ``$MK_CANDIDATE_LOG`` as one JSON line ``{t_start, t_end, score, results, config}``, where
``config`` is the candidate's mergekit YAML (mergekit-evolve itself only sends per-candidate
scores to wandb). ``MK_SEED`` seeds numpy (pycma draws from numpy's global generator).

    PYTHONPATH=SHIM MK_CANDIDATE_LOG=c.jsonl python evolve_logged.py --storage-path RUN ... CFG
"""

import json
import os
import time

import numpy as np
import ray

if os.environ.get("MK_SEED"):
    np.random.seed(int(os.environ["MK_SEED"]))

ray.init(
    num_cpus=int(os.environ.get("MK_RAY_CPUS", "2")),
    num_gpus=int(os.environ.get("MK_FAKE_GPUS", "1")),
    include_dashboard=False,
    log_to_driver=True,
)

from mergekit.evo import strategy  # noqa: E402
from mergekit.scripts.evolve import main  # noqa: E402

LOG = os.environ.get("MK_CANDIDATE_LOG")


def _logged(orig):
    def evaluate_genotypes(self, genotypes):
        t0 = time.time()
        results = orig(self, genotypes)
        t1 = time.time()
        if LOG:
            with open(LOG, "a", encoding="utf-8") as f:
                for x, r in zip(genotypes, results, strict=True):
                    cfg = self.genome.genotype_merge_config(x).to_yaml()
                    row = {"t_start": t0, "t_end": t1, "n": len(genotypes),
                           "score": r.get("score"), "results": r.get("results"), "config": cfg}
                    f.write(json.dumps(row, default=str) + "\n")
        return results

    return evaluate_genotypes


for _name in ("ActorPoolEvaluationStrategy", "BufferedRayEvaluationStrategy",
              "SerialEvaluationStrategy"):
    _cls = getattr(strategy, _name)
    _cls.evaluate_genotypes = _logged(_cls.evaluate_genotypes)

if __name__ == "__main__":
    main()
