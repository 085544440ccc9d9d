"""One stage of the attribution: score every corpus shard against the queries (needs committed query gradients).

    python jobs/score.py                 # on the embedded demo
    python jobs/score.py run.id=my-run model=hf model.path=... corpus.path=... queries.path=...

Same config as jobs/attribute.py (conf/attribute.yaml); committed units are skipped.
"""

import hydra

from pipeline.config import register_configs, to_config
from pipeline.jobs_common import exit_on_bad_input
from pipeline.run import run_stages

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="attribute")
def main(cfg) -> None:
    with exit_on_bad_input():
        run_stages(to_config(cfg), ("score",))


if __name__ == "__main__":
    main()
