"""Attribution quality: planted facts, a backdoor, projection fidelity, exact oracle, LDS.

Trains its own tiny models (seeded), scores them with our EK-FAC (projection
off and the default projection) and the baselines (BM25, RepSim, gradient dot
product, gradient cosine, chance), prints the tables and writes
``{storage.root}/evaluations/{name}.json``.

    python jobs/evaluate.py                                   # the published figures (CPU, tens of minutes)
    python jobs/evaluate.py name=quick small.lds_subsets=4 small.epochs=10 \
        backdoor.epochs=2 fidelity.dims=[8,32] demo.n_filler_docs=100 demo.train_steps=100 backdoor.n_docs=60   # CPU-sized, minutes
    python jobs/evaluate.py backdoor.enabled=false small.lds=false   # facts, fidelity and oracle only
    python jobs/evaluate.py world=smollm2 name=smollm2 threads=1 'smollm2.dims=[32,128,256]' smollm2.cost_batches=2
        # the real model (SmolLM2-135M fine-tuned on planted facts): settings vs exact EK-FAC, cost, the default

With ``world=smollm2`` the sections are ``smollm2`` only (the sweep, the chosen
default, planted facts); the backdoor and small-world sections are the tiny
demo's.

Config: conf/evaluate.yaml (schema, defaults and field docs: benchmarks/evaluate/config.py, EvaluateConfig).
"""

import hydra

from benchmarks.evaluate.config import register_configs, to_config
from benchmarks.evaluate.report import format_report
from benchmarks.evaluate.run import run_evaluation
from pipeline.jobs_common import exit_on_bad_input

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg) -> None:
    with exit_on_bad_input():
        print(format_report(run_evaluation(to_config(cfg))))


if __name__ == "__main__":
    main()
