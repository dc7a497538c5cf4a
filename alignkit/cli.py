"""The ``alignkit`` command.

``fit`` / ``validate`` run one recipe through LightningCLI (``--config``, dotted overrides,
``--print_config``); the other commands are typed functions whose parameters are their options (the
litgpt way): ``pipeline``, ``plugins``, ``collect``, ``eval``.
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from alignkit.checkpoint import AtomicCheckpointIO, LastCheckpoint
from alignkit.data.modules import AlignData
from alignkit.module import AlignModule
from alignkit.run import RunDirectory, check_fresh, default_run_dir, resume_checkpoint
from alignkit.seeds import fill_seeds, global_seed

TRAINER_COMMANDS = ("fit", "validate")
RUN_DIR_ENV = "ALIGNKIT_RUN_DIR"


class AlignCLI(LightningCLI):
    """LightningCLI with alignkit's run directory, default loggers and export callback."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        with warnings.catch_warnings():
            # in-process calls (pipeline stages, tests) pass `args` on purpose while sys.argv holds the parent's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().__init__(
                AlignModule, AlignData, subclass_mode_data=True, seed_everything_default=0, args=args, run=run,
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                trainer_defaults={"deterministic": True}, parser_kwargs={"exit_on_error": False},
            )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: LightningCLI.subcommands()[name] for name in TRAINER_COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (default: runs/<recipe>/<timestamp>). Must not hold a finished model.")
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="wandb group of this run (default: the recipe's name).")
        parser.add_argument("--wandb", type=bool, default=True,
                            help="Log to wandb in offline mode (no account or network needed; `wandb sync` later).")
        parser.add_argument("--checkpoint_every", type=int | None, default=None,
                            help="Write checkpoints/last.ckpt every N optimiser steps (default: at the end of each epoch).")
        parser.add_argument("--resume", type=bool, default=False,
                            help="Continue the unfinished run in --run_dir from its checkpoints/last.ckpt.")

    @property
    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def recipe(self) -> str | None:
        configs = self._cfg.get("config") or []
        return str(configs[-1]) if configs else None

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg
        # Lightning's DDP children re-run this command: they must reuse the parent's timestamped default.
        inherited = os.environ.get(RUN_DIR_ENV) if int(os.environ.get("LOCAL_RANK", "0")) > 0 else None
        run_dir = cfg.run_dir or cfg.trainer.default_root_dir or inherited or str(default_run_dir(self.recipe))
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if self.subcommand == "fit" and cfg.resume:
            if cfg.get("ckpt_path"):
                raise ArgumentError(None, "give --resume true or --ckpt_path, not both")
            cfg.ckpt_path = str(resume_checkpoint(Path(run_dir)))
        elif self.subcommand == "fit":
            check_fresh(Path(run_dir))
        cfg.run_dir = cfg.trainer.default_root_dir = str(run_dir)
        # One seed drives the run: every seed left unset derives from it by its role (recorded in config.yaml).
        run_seed = cfg.seed_everything if cfg.seed_everything is not False else global_seed()
        fill_seeds(cfg, run_seed)

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._cfg
        run_dir = Path(cfg.run_dir)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self.default_loggers(run_dir)
        kwargs["callbacks"] = [*(trainer_cfg.get("callbacks") or []), RunDirectory(run_dir, self.recipe)]
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            kwargs["callbacks"].append(LastCheckpoint(run_dir / "checkpoints", cfg.get("checkpoint_every")))
        kwargs["plugins"] = self.checkpoint_plugins(trainer_cfg.get("plugins"))
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            kwargs["callbacks"].append(RichProgressBar(leave=True))
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def checkpoint_plugins(plugins: Any) -> list:
        """The trainer's plugins plus :class:`AtomicCheckpointIO`, unless a checkpoint writer is given."""
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return plugins

    def default_loggers(self, run_dir: Path) -> list:
        loggers: list = [CSVLogger(save_dir=run_dir, name="", version="")]
        if self._cfg.wandb:
            algorithm = self._cfg.model.algorithm.class_path.rsplit(".", 1)[-1]
            group = self._cfg.experiment or (Path(self.recipe).stem if self.recipe else "alignkit")
            os.environ.setdefault("WANDB_SILENT", "true")
            # A resumed run keeps its wandb run id (offline runs then write a second folder under that id).
            previous = wandb_run_id(run_dir) if self._cfg.get("resume") else None
            resumed = {"id": previous, "resume": "allow"} if previous else {}
            loggers.append(WandbLogger(project="alignkit", save_dir=str(run_dir), offline=True, group=group,
                                       tags=[algorithm], name=f"{group}/{run_dir.name}", job_type=algorithm,
                                       config=self._cfg.clone().as_dict(), **resumed))
        return loggers


def fit(args: list[str]) -> Path:
    """Run ``alignkit fit`` in-process and return its run directory (used by the pipeline)."""
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


def main(argv: list[str] | None = None) -> None:
    from alignkit import commands

    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in commands.available():
            commands.run(argv[0], argv[1:])
        else:
            AlignCLI(args=None if from_command_line else argv)
    except (*commands.USER_ERRORS, ArgumentError) as exc:
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the library's layout
        kind = "" if isinstance(exc, ArgumentError) else f"{type(exc).__name__}: "
        print(f"alignkit: error: {kind}{message} (run with --help for the options)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
