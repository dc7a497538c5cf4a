"""The ``alignkit`` command.

``fit`` / ``validate`` run one recipe through LightningCLI (``--config``, dotted overrides,
``--print_config``); the other commands are typed functions whose parameters are their options (the
litgpt way): ``pipeline``, ``plugins``, ``collect``, ``eval``.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from alignkit.checkpoint import WRITE_FAILED_EXIT_CODE, AtomicCheckpointIO, LastCheckpoint
from alignkit.data.modules import AlignData
from alignkit.errors import WriteFailed
from alignkit.fitting import finish_wandb_run, fit, wandb_run_id  # noqa: F401  (fit: importable from here too)
from alignkit.io import atomic_write_text, write_errno
from alignkit.lock import RunLock, is_launch_rank_zero
from alignkit.module import AlignModule
from alignkit.progress import AlignProgressBar
from alignkit.run import (
    CONFIG_FILE,
    ConfigChangedError,
    NewHyperparameters,
    RunCSVLogger,
    RunDirectory,
    RunWandbLogger,
    check_fresh,
    check_resume_config,
    default_run_dir,
    describe_changes,
    record_changes,
    resume_checkpoint,
)
from alignkit.seeds import fill_seeds, global_seed
from alignkit.signals import Preempted, StopOnSignal

TRAINER_COMMANDS = ("fit", "validate")
RUN_DIR_ENV = "ALIGNKIT_RUN_DIR"
#: The checkpoint a resumed run's rank 0 chose, for the other ranks Lightning launches.
RESUME_ENV = "ALIGNKIT_RESUME_CHECKPOINT"


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's config saving, written atomically (a killed run never leaves half a ``config.yaml``, which a
    resume compares with)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        assert log_dir is not None
        if trainer.is_global_zero:
            atomic_write_text(Path(log_dir) / self.config_filename, self.parser.dump(self.config, skip_unset=False))
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


#: ``--help`` and ``--print_config=comments`` document a dataclass field by the docstring below it (ModelConfig,
#: SamplingConfig, ...), as docs/reference.md does.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class AlignCLI(LightningCLI):
    """LightningCLI with alignkit's run directory (locked while it runs), default loggers and export callback."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        self.run_lock: RunLock | None = None
        try:
            with warnings.catch_warnings():
                # in-process calls (pipeline stages, tests) pass `args` on purpose while sys.argv holds the parent's
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                super().__init__(
                    AlignModule, AlignData, subclass_mode_data=True, seed_everything_default=0, args=args, run=run,
                    save_config_callback=AtomicSaveConfig, save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False, trainer_defaults={"deterministic": True},
                    parser_kwargs={"exit_on_error": False},
                )
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `validate --verbose` is alignkit's switch (as on every command), not Trainer.validate's table toggle
        return {name: LightningCLI.subcommands()[name] | ({"verbose"} if name == "validate" else set())
                for name in TRAINER_COMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (default: runs/<recipe>/<timestamp>). Must not hold a finished model.")
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="wandb group of this run (default: the recipe's name).")
        parser.add_argument("--wandb", type=bool, default=True,
                            help="Log to wandb in offline mode (no account or network needed; `wandb sync` later).")
        parser.add_argument("--checkpoint_every", type=int | None, default=None,
                            help="Write a checkpoint (checkpoints/step=N.ckpt, linked as last.ckpt) every N optimiser "
                                 "steps (default: at the end of each epoch).")
        parser.add_argument("--keep_checkpoints", type=int, default=2,
                            help="Keep the newest N checkpoints (each with its SHA-256 beside it): a resume falls back "
                                 "to an older one when the newest is damaged.")
        parser.add_argument("--resume", type=bool, default=False,
                            help="Continue the unfinished run in --run_dir from its newest intact checkpoint; the "
                                 "configuration must be the one it was started with.")
        parser.add_argument("--quiet", type=bool, default=True,
                            help="Silence the libraries' known noise (tips, their own deprecations, progress bars of "
                                 "single-file writes; alignkit/quiet.py); --quiet false (or --verbose) keeps it.")
        parser.add_argument("--verbose", action="store_true",
                            help="Show the libraries' noise that alignkit silences by default (the same as --quiet "
                                 "false).")
        parser.add_argument("--resume_with_changes", type=bool, default=False,
                            help="With --resume: accept a configuration that differs from the run's config.yaml; the "
                                 "changes are recorded in resume_changes.jsonl and the new optimiser settings (e.g. "
                                 "the learning rate) replace the checkpoint's.")

    @property
    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    @property
    def recipe(self) -> str | None:
        configs = self._cfg.get("config") or []
        return str(configs[-1]) if configs else None

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg
        child = int(os.environ.get("LOCAL_RANK", "0")) > 0
        # Lightning's DDP children re-run this command: they must reuse the parent's timestamped default.
        inherited = os.environ.get(RUN_DIR_ENV) if child else None
        run_dir = Path(cfg.run_dir or cfg.trainer.default_root_dir or inherited or str(default_run_dir(self.recipe)))
        os.environ[RUN_DIR_ENV] = str(run_dir)
        if cfg.keep_checkpoints < 1:
            raise ArgumentError(None, f"--keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
        if cfg.resume and not (cfg.run_dir or cfg.trainer.default_root_dir or inherited):
            raise ArgumentError(None, "--resume true needs --run_dir: the directory of the run to continue")
        if cfg.resume_with_changes and not cfg.resume:
            raise ArgumentError(None, "--resume_with_changes true needs --resume true")
        if self.subcommand == "fit" and cfg.resume and cfg.get("ckpt_path"):
            raise ArgumentError(None, "give --resume true or --ckpt_path, not both")
        cfg.run_dir = cfg.trainer.default_root_dir = str(run_dir)
        # One seed drives the run: every seed left unset derives from it by its role (recorded in config.yaml).
        run_seed = cfg.seed_everything if cfg.seed_everything is not False else global_seed()
        fill_seeds(cfg, run_seed)
        fill_tiny_data(cfg)
        if cfg.get("quiet", True) and not cfg.get("verbose", False):
            from alignkit.quiet import quiet

            quiet()
        rank_zero = is_launch_rank_zero()
        if rank_zero and self.subcommand == "fit":
            check_fresh(run_dir, resuming=cfg.resume)  # a refusal writes nothing, not even the lock
        if rank_zero:  # one writer per run directory, from here to the end of the command
            os.environ.pop(RESUME_ENV, None)
            self.run_lock = RunLock(run_dir).acquire()
        if self.subcommand != "fit":
            return
        if not cfg.resume:
            if rank_zero:
                check_fresh(run_dir)
            return
        if not rank_zero:  # the checkpoint rank 0 chose (it may have set damaged ones aside)
            cfg.ckpt_path = os.environ.get(RESUME_ENV) or str(resume_checkpoint(run_dir, set_aside=False))
            return
        import yaml

        check_fresh(run_dir, resuming=True)
        new = yaml.safe_load(self._parser(self.subcommand).dump(cfg, skip_unset=False))
        changes = check_resume_config(run_dir, new, cfg.resume_with_changes)
        checkpoint = resume_checkpoint(run_dir)
        if changes:
            record_changes(run_dir, changes, checkpoint)
            print(f"alignkit: resuming {run_dir} with a changed configuration: {describe_changes(changes)} (recorded "
                  f"in {run_dir / 'resume_changes.jsonl'}; {CONFIG_FILE} now holds the new one)", file=sys.stderr)
        cfg.ckpt_path = os.environ[RESUME_ENV] = str(checkpoint)

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._cfg
        run_dir = Path(cfg.run_dir)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self.default_loggers(run_dir)
        kwargs["callbacks"] = [
            *(trainer_cfg.get("callbacks") or []), RunDirectory(run_dir, self.recipe), StopOnSignal(),
        ]
        if cfg.get("resume_with_changes"):
            kwargs["callbacks"].append(NewHyperparameters())
        if trainer_cfg.get("enable_checkpointing", True) is not False:
            kwargs["callbacks"].append(LastCheckpoint(run_dir / "checkpoints", cfg.get("checkpoint_every"),
                                                      cfg.get("keep_checkpoints", 2)))
        kwargs["plugins"] = self.checkpoint_plugins(trainer_cfg.get("plugins"))
        if trainer_cfg.get("enable_progress_bar", True) is not False:
            kwargs["callbacks"].append(AlignProgressBar(leave=True))
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def checkpoint_plugins(plugins: Any) -> list:
        """The trainer's plugins plus :class:`AtomicCheckpointIO`, unless a checkpoint writer is given."""
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return plugins

    def default_loggers(self, run_dir: Path) -> list:
        loggers: list = [RunCSVLogger(save_dir=run_dir, name="", version="")]
        if self._cfg.wandb:
            algorithm = self._cfg.model.algorithm.class_path.rsplit(".", 1)[-1]
            group = self._cfg.experiment or (Path(self.recipe).stem if self.recipe else "alignkit")
            os.environ.setdefault("WANDB_SILENT", "true")
            # A resumed run keeps its wandb run id (offline runs then write a second folder under that id).
            # (resume="allow" is also WandbLogger's default: a new run without an id)
            previous = wandb_run_id(run_dir) if self._cfg.get("resume") else None
            loggers.append(RunWandbLogger(project="alignkit", save_dir=str(run_dir), offline=True, group=group,
                                       tags=[algorithm], name=f"{group}/{run_dir.name}", job_type=algorithm,
                                       config=self._cfg.clone().as_dict(), id=previous or None, resume="allow"))
        return loggers


#: Options whose value may be a plugin's name as ``alignkit plugins`` prints it (``--model.algorithm=dpo``); a list
#: of names for ``model.rewards`` (``--model.rewards='[gold_reward]'``). (``model.policy.tiny.task`` takes a task's
#: name itself.)
NAMED_OPTIONS = ("model.algorithm", "data.init_args.task", "model.rewards", "task", "reward", "judge", "labeller")


def resolve_plugin_names(argv: list[str]) -> list[str]:
    """``argv`` with every plugin name given to a :data:`NAMED_OPTIONS` option replaced by its class path (a class
    path, or anything that is not a registered name, is left as it is)."""
    import json

    import yaml

    from alignkit.manager import class_path_of

    out: list[str] = []
    for i, arg in enumerate(argv):
        key, equals, value = arg.partition("=")
        previous = argv[i - 1] if i else ""
        if not equals and previous.startswith("--") and "=" not in previous:  # "--key value"
            key, value = previous, arg
        elif not equals:
            out.append(arg)
            continue
        if not key.startswith("--") or key[2:] not in NAMED_OPTIONS:
            out.append(arg)
            continue
        path = class_path_of(value)
        if path is None and value.startswith("["):
            items = yaml.safe_load(value)
            resolved = resolve_named_value(items, tuple(key[2:].split(".")))
            path = json.dumps(resolved) if resolved != items else None
        if path is not None:
            arg = f"{key}={path}" if equals else path
        out.append(arg)
    return out


def resolve_config_names(value: Any, path: tuple[str, ...] = ()) -> Any:
    """A loaded YAML config (a recipe, a ``--config`` file) with plugin names as ``alignkit plugins`` prints them
    replaced by class paths, as :func:`resolve_plugin_names` does on the command line: the value of a
    :data:`NAMED_OPTIONS` key (``model: {algorithm: dpo}``, ``rewards: [gold_reward]``, ``task: sentiment``) and any
    ``class_path`` without a dot (``class_path: dpo``, its ``init_args`` kept). Anything else is left as it is."""
    from alignkit.manager import class_path_of

    if isinstance(value, list):
        return [resolve_config_names(item, path) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        where = (*path, str(key))
        if key == "class_path" and isinstance(item, str) and "." not in item:
            out[key] = class_path_of(item) or item
        elif ".".join(where) in NAMED_OPTIONS:
            out[key] = resolve_named_value(item, where)
        else:
            out[key] = resolve_config_names(item, where)
    return out


def resolve_named_value(value: Any, where: tuple[str, ...]) -> Any:
    """The value of the :data:`NAMED_OPTIONS` key ``where`` with plugin names replaced by class paths: a name, or a
    list whose names become ``{class_path: ...}`` entries (its other entries as :func:`resolve_config_names` reads
    them)."""
    from alignkit.manager import class_path_of

    if isinstance(value, str):
        return class_path_of(value) or value
    if isinstance(value, list):
        return [{"class_path": path} if isinstance(x, str) and (path := class_path_of(x)) else
                resolve_config_names(x, where) for x in value]
    return resolve_config_names(value, where)


def _load_yaml_with_plugin_names(text: str) -> Any:
    return resolve_config_names(_load_yaml(text))


#: Config files and values are read by jsonargparse's YAML loader, followed by :func:`resolve_config_names`.
_load_yaml = get_loader("yaml")
set_loader("yaml", _load_yaml_with_plugin_names, exceptions=(yaml.YAMLError,))


def fill_tiny_data(cfg: Any) -> None:
    """The tiny model trained on the user's data file reads it without ``<unk>``: unless ``model.policy.tiny.data``
    is set, its byte-level tokenizer is also trained on ``data.init_args.path`` (recorded in ``config.yaml``)."""
    policy = cfg.get("model.policy")
    path = cfg.get("data.init_args.path") if cfg.get("data.init_args") is not None else None
    if policy is None or policy.get("name_or_path") != "tiny" or not path or policy.get("tiny") is None:
        return
    if policy.tiny.get("data") is None:
        policy.tiny.data = str(path)


def main(argv: list[str] | None = None) -> None:
    from alignkit import commands

    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    debug = bool(os.environ.get("ALIGNKIT_DEBUG"))
    try:
        argv = resolve_plugin_names(argv)
        if from_command_line:
            sys.argv[1:] = argv  # LightningCLI reads sys.argv
        if argv and argv[0] in commands.targets():
            commands.run(argv[0], argv[1:])
        else:
            AlignCLI(args=None if from_command_line else argv)
    except Preempted as exc:
        print(f"alignkit: {exc.message()}", file=sys.stderr)
        raise SystemExit(exc.code) from None
    except WriteFailed as exc:
        if debug:
            raise
        print(f"alignkit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(WRITE_FAILED_EXIT_CODE) from None
    except (*commands.USER_ERRORS, ArgumentError, ConfigChangedError, MisconfigurationException) as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the library's layout
        kind = "" if isinstance(exc, ArgumentError) else f"{type(exc).__name__}: "
        print(f"alignkit: error: {kind}{message} (run with --help for the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        number = write_errno(exc)  # a full disk met by a write without a file name of its own (a library's)
        if debug:
            raise
        cause = user_error_cause(exc, commands.USER_ERRORS)
        if cause is not None and number is None:  # e.g. a plugin's __init__ failing inside jsonargparse
            print(f"alignkit: error: {type(cause).__name__}: {' '.join(str(cause).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        if number not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        failed = WriteFailed(where or f"a file in {os.environ.get(RUN_DIR_ENV, 'the run directory')}", number)
        print(f"alignkit: error: {failed}", file=sys.stderr)
        raise SystemExit(WRITE_FAILED_EXIT_CODE) from None


def user_error_cause(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first user error (one of ``kinds``) among the explicit causes (``raise ... from``) of ``exc``: jsonargparse
    wraps an error raised while it builds a component (a reward model directory that is gone, say) in a ValueError
    listing every type it tried; the cause is what the user must fix. Implicit contexts are not followed, so a bug
    raised while handling some OSError is not passed off as a user error."""
    current = exc.__cause__
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes and contexts."""
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


if __name__ == "__main__":
    main()
