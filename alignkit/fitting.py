"""Training runs started from Python: :func:`fit` runs one recipe in-process, as ``alignkit fit`` does, and
closes the wandb run it opened, so that the next in-process run (a pipeline stage, an iterative round, a study
cell) logs into a run of its own.

This is the run layer's entry point for code that trains (the pipeline, plugins such as ``iterative``):
such code imports :func:`fit` from here (or from the public ``alignkit`` namespace), never from
:mod:`alignkit.cli`, which parses the command line. Importing this module is cheap: the CLI machinery
(LightningCLI, the module, the data modules) is loaded when :func:`fit` is first called.
"""

from __future__ import annotations

import sys
from pathlib import Path


def fit(args: list[str]) -> Path:
    """Run ``alignkit fit <args>`` in-process and return its run directory (used by the pipeline). The
    process's wandb run is finished afterwards, also when the fit fails."""
    from alignkit.cli import AlignCLI  # the command's own parser, trainer set-up and callbacks

    try:
        cli = AlignCLI(args=["fit", *args])
    finally:
        finish_wandb_run()
    return Path(cli.config.fit.run_dir)


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run logged in ``run_dir`` (its folders are ``wandb/<mode>-run-<time>-<id>``)."""
    runs = sorted((run_dir / "wandb").glob("*-run-*-*"), key=lambda folder: folder.name.split("-run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def finish_wandb_run() -> None:
    """End the process's active wandb run, if any: Lightning's WandbLogger leaves it open after a fit, and
    a later in-process fit (the next pipeline stage) would silently log into it instead of its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


__all__ = ["finish_wandb_run", "fit", "wandb_run_id"]
