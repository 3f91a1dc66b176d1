"""Main job: `torchrun --nproc-per-node N -m megatron_a3po.train --config configs/X.yaml [Megatron/RL flags]`.

The entry point only: parse the flags, resolve and validate the job once (job.py) before any process group
exists, then run it on the ranks (rl_job.py). `--dry-run` prints the resolved config and layout, reads what the
job will read (the tokenizer, every dataset row, the reward function: job.check_inputs) and exits, 2 on a problem.
"""

from __future__ import annotations

import json
import sys

from megatron_a3po import config as C
from megatron_a3po.errors import EXIT_USER_ERROR, UserError, report
from megatron_a3po.job import check_inputs, resolve_job, world_size_from_env


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = C.parse_args(sys.argv[1:] if argv is None else argv, description=__doc__)
        job = resolve_job(cfg, world_size_from_env())
    except UserError as err:
        return report(err, "config error")
    if args.dry_run:  # and read what the ranks would read only after building the model and starting vLLM
        print(json.dumps(job.cfg.to_dict(), indent=2, default=str))
        print(job.describe())
        notes, problems = check_inputs(job)
        print("\n".join(notes))
        for problem in problems:
            report(UserError(problem), "input error")
        return EXIT_USER_ERROR if problems else 0
    from megatron_a3po import rl_job

    return rl_job.main(job)


if __name__ == "__main__":
    sys.exit(main())
