"""Retention: remove runs beyond a policy and every shared object no kept run references.

    python jobs/gc.py gc.keep_last=7                   # dry run: prints what would be deleted
    python jobs/gc.py gc.keep_last=7 gc.keep_days=30 gc.apply=true
    python jobs/gc.py storage=s3 storage.root=s3://bucket/attribution gc.keep_days=14 gc.apply=true

Config: conf/gc.yaml (schema and field docs: pipeline/gc.py, GcConfig). A policy
that would delete the run latest.json names is refused with one line (exit
status 2). Do not run it while a nightly run is starting.
"""

import hydra

from pipeline.gc import GcConfig, apply_gc, describe, plan_gc, register_configs
from pipeline.jobs_common import exit_on_error

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="gc")
def main(cfg) -> None:
    from pipeline.config import to_typed

    with exit_on_error():
        config = to_typed(GcConfig, cfg)
        storage = config.storage.open()
        plan = plan_gc(storage, config.gc.keep_last, config.gc.keep_days,
                       running_stale_hours=config.gc.running_stale_hours)
        if config.gc.apply:
            apply_gc(storage, plan)
        print(describe(plan, config.gc.apply))


if __name__ == "__main__":
    main()
