"""Two runs compared: per query and polarity, the rows that entered, left or moved in the top-k.

    python jobs/diff.py diff.run_a=nightly-2026-11-22 diff.run_b=nightly-2026-11-23
    python jobs/diff.py storage=s3 storage.root=s3://bucket/attribution diff.run_a=... diff.run_b=...

Config: conf/diff.yaml (schema and field docs: pipeline/diff.py, DiffConfig).
Writes {storage.root}/diffs/{run_a}__vs__{run_b}.parquet and prints a summary.
Runs scored for different query sets are refused with one line (exit status 2).
"""

import hydra

from pipeline.diff import DiffConfig, diff_runs, register_configs, summary, write_diff
from pipeline.jobs_common import exit_on_error

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="diff")
def main(cfg) -> None:
    from pipeline.config import to_typed

    with exit_on_error():
        config = to_typed(DiffConfig, cfg)
        storage = config.storage.open()
        a, b = config.diff.run_a, config.diff.run_b
        table = diff_runs(storage, a, b)
        print(summary(a, b, table, write_diff(storage, a, b, table)))


if __name__ == "__main__":
    main()
