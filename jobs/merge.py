"""One stage of the attribution: merge committed shard results into the ranked table (refuses while a shard is uncommitted).

    python jobs/merge.py                 # on the embedded demo
    python jobs/merge.py run.id=my-run model=hf model.path=... corpus.path=... queries.path=...

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
        run_stages(to_config(cfg), ("merge",))


if __name__ == "__main__":
    main()
