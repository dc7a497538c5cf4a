"""Test-only: several ``alignkit fit`` runs, one after another, in the same two training processes.

``python tests/distributed_worker.py JOBS.json`` runs each job of ``JOBS.json`` (a list of ``alignkit fit`` argument
lists, each with its own ``--run_dir`` and ``--trainer.devices=2``) through :func:`alignkit.cli.main`, in order. The
first fit launches rank 1 the way ``alignkit fit`` does (Lightning's launcher re-runs this command with
``LOCAL_RANK=1``), and leaves ``LOCAL_RANK`` set in rank 0's environment, so every later fit finds both processes
already there and reuses their process group, which Lightning keeps for the life of the process (it never destroys
a gloo group). Each run is still a separate Trainer, model, optimiser and run directory: only the ~10 s interpreter
start-up (torch, Lightning, transformers) and the process-group rendezvous are paid once per launch instead of once
per run (tests/test_distributed.py).

After each job every rank writes ``<status>/<job>.rank<r>``: ``ok``, or the traceback of the job's failure, after
which that rank exits at once (the other rank's next collective then fails, it reports and exits too), so a failure
names its job and the caller can launch the jobs left after it again.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))  # one node; rank 0 has none until its first fit launches rank 1


def main(jobs_file: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    status = Path(spec["status"])
    from alignkit.cli import main as alignkit

    for name, argv in spec["jobs"].items():
        try:
            alignkit(argv)
        except BaseException as exc:  # noqa: BLE001  (SystemExit(2) from a refused command line too)
            (status / f"{name}.rank{rank()}").write_text("".join(traceback.format_exception(exc)))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        (status / f"{name}.rank{rank()}").write_text("ok")
        gc.collect()  # the finished run's trainer, engines and models, before the next one is built
    import torch.distributed

    if torch.distributed.is_initialized():  # rank 0 leaves only once rank 1 has reported its last job
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
