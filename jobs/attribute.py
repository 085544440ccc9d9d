"""The main job: fit EK-FAC factors, precondition the queries, score the corpus on Ray, merge.

    python jobs/attribute.py                       # embedded demo: local Ray, local storage, demo model
    python jobs/attribute.py run.id=try2 projection.dim=0 score.top_k=5
    python jobs/attribute.py run.stages=[fit,precondition]   # some stages only; committed units are skipped
    ray job submit --address http://HEAD:8265 -- python jobs/attribute.py cluster=ray storage=s3 \
        storage.root=s3://bucket/attribution model=hf model.path=s3://bucket/models/lm \
        corpus.path=s3://bucket/corpus/ queries.path=s3://bucket/queries.jsonl run.id=nightly-2026-11-22

Config: conf/attribute.yaml (schema and field docs: pipeline/config.py). The
ranked table's summary is printed when the merge ran.

Exit status: 0 done, 2 bad input (one line naming it), 3 storage or cluster
fault (one line; a worker's traceback goes to runs/{run.id}/logs/ in
storage), 1 a bug. Give credentials through the AWS environment variables or a
credentials file, not storage.options on the command line: Hydra saves no
copy of the config (conf/attribute.yaml), but the shell history and the
process list would show them.
"""

import datetime

import hydra

from pipeline import layout
from pipeline.config import register_configs, to_config
from pipeline.jobs_common import exit_on_error
from pipeline.run import run_attribution
from pipeline.summary import format_summary

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="attribute")
def main(cfg) -> None:
    with exit_on_error() as failure_log:
        config = to_config(cfg)
        storage = config.storage.open()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        failure_log.point_at(storage, layout.failure_log(storage.root, config.run.id, stamp))
        manifest = run_attribution(config)
        if manifest is None:
            return
        print(format_summary(manifest, storage, config.demo.show, config.corpus.id_column,
                             config.corpus.text_column, config.storage.options))


if __name__ == "__main__":
    main()
