"""The terminal view of a run: a query's top proponents and opponents, tokens coloured by contribution.

    python jobs/show.py run.id=demo query=fact-00
    python jobs/show.py run.id=demo query=fact-00 show.rows=3 show.polarity=opponent show.color=false
    python jobs/show.py storage=s3 storage.root=s3://bucket/attribution run.id=nightly-2026-11-22 query=q1

Config: conf/show.yaml (schema and field docs: pipeline/show.py, ShowConfig).
Green tokens raise the completion's log-probability, red ones lower it.
"""

import hydra

from pipeline.jobs_common import exit_on_bad_input
from pipeline.show import ShowConfig, format_query, register_configs
from pipeline.storage import Storage

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="show")
def main(cfg) -> None:
    from pipeline.config import to_typed

    with exit_on_bad_input():
        config = to_typed(ShowConfig, cfg)
        storage = Storage(config.storage.root, config.storage.options)
        print(format_query(storage, config.run.id, config.query, config.show))


if __name__ == "__main__":
    main()
