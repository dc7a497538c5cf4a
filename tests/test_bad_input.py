"""Bad input stops a run with a short error that names the culprit, and never leaves a model behind
(nor touches a finished one)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from conftest import RM_RECIPE, SFT_RECIPE, run_cli, write_jsonl

import alignkit.cli  # noqa: F401  (imported before any test captures stderr: lightning's log handler binds it)


def fail(capsys, argv: list) -> str:
    """Run ``alignkit argv`` in-process; it must exit with code 2. Returns what it printed to stderr."""
    with pytest.raises(SystemExit) as info:
        run_cli(argv)
    assert info.value.code == 2, f"exit code {info.value.code!r}"
    return capsys.readouterr().err


def error_text(stderr: str) -> str:
    """The error part of stderr (jsonargparse prints the usage first, then ``error: ...``)."""
    assert "error:" in stderr, stderr[-2000:]
    return stderr[stderr.rindex("error:"):]


def alignkit_error(stderr: str) -> str:
    """alignkit's own user errors: exactly one line ``alignkit: error: <Type>: <message>``."""
    lines = [line for line in stderr.splitlines() if line.startswith("alignkit: error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


def fit_args(tiny_overrides, run_dir: Path, *extra) -> list:
    return ["fit", "--config", SFT_RECIPE, *tiny_overrides, "--data.init_args.task.init_args.num_train_prompts=50",
            *extra, "--run_dir", run_dir]


def test_unknown_algorithm_class_path(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    err = error_text(fail(capsys, fit_args(tiny_overrides, run_dir,
                                           "--model.algorithm.class_path=alignkit_plugins.sft.NoSuchAlgorithm")))
    assert "alignkit_plugins.sft.NoSuchAlgorithm" in err
    assert "model.algorithm" in err
    assert not (run_dir / "model").exists()


def test_unknown_yaml_key(capsys, tmp_path, tiny_overrides):
    recipe = SFT_RECIPE.read_text()
    assert "    lr: 3.0e-3\n" in recipe
    typo = tmp_path / "sft_typo.yaml"
    typo.write_text(recipe.replace("    lr: 3.0e-3\n", "    lr: 3.0e-3\n    learning_rat: 1.0e-3\n"))
    run_dir = tmp_path / "run"
    args = fit_args(tiny_overrides, run_dir)
    args[2] = typo
    err = error_text(fail(capsys, args))
    assert "learning_rat" in err
    assert not (run_dir / "model").exists()


def test_missing_data_file(capsys, tmp_path, tiny_overrides):
    run_dir, missing = tmp_path / "run", tmp_path / "no_such_file.jsonl"
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--data.init_args.path={missing}")))
    assert "DataError" in line and str(missing) in line and "does not exist" in line
    assert not (run_dir / "model").exists()


def test_missing_columns(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    path = write_jsonl(tmp_path / "wrong_columns.jsonl", [{"question": "review : the tea", "answer": "nice tea"}])
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--data.init_args.path={path}")))
    assert str(path) in line and "question" in line and "answer" in line
    assert not (run_dir / "model").exists()


def test_missing_column_of_an_explicit_format(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "review : the tea", "answer": "nice tea"}])
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--data.init_args.path={path}",
                                                "--data.init_args.format=prompt_response")))
    assert str(path) in line and "response" in line
    assert not (run_dir / "model").exists()


@pytest.mark.parametrize("column", ["prompt", "response"])
def test_empty_prompt_or_response(capsys, tmp_path, tiny_overrides, column):
    run_dir = tmp_path / "run"
    rows = [{"prompt": "review : the tea", "response": "nice tea"}, {"prompt": "review : the pie", "response": "good"}]
    rows[1][column] = "   "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--data.init_args.path={path}")))
    assert f"{path} row 2" in line and repr(column) in line
    assert not (run_dir / "model").exists()


def test_empty_preference_answer(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "review : the tea", "chosen": "", "rejected": "bad"}])
    args = ["fit", "--config", RM_RECIPE, *tiny_overrides,
            "--model.policy.name_or_path=tiny", f"--data.init_args.path={path}", "--run_dir", run_dir]
    line = alignkit_error(fail(capsys, args))
    assert f"{path} row 1" in line and "'chosen'" in line
    assert not (run_dir / "model").exists()


def test_too_long_with_truncation_error(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    rows = [{"prompt": "review : the tea", "response": "nice tea"},
            {"prompt": "review : the pizza at the diner on monday and the soup at the cafe on friday",
             "response": "great"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--data.init_args.path={path}",
                                                "--data.init_args.truncation=error",
                                                "--data.init_args.max_prompt_length=8")))
    assert f"{path} row 2" in line and "max_prompt_length=8" in line and "truncation: error" in line
    assert not (run_dir / "model").exists()


def test_algorithm_and_data_kinds_must_match(capsys, tmp_path, tiny_overrides, preferences_file):
    """SFT trains on demonstrations; given preference pairs it must stop before training, naming both
    (``Algorithm.data_kind`` is "checked against the data module")."""
    run_dir = tmp_path / "run"
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, "--data=alignkit.data.PreferenceData",
                                                f"--data.init_args.path={preferences_file}")))
    assert "SFT" in line and "PreferenceData" in line
    assert "alignkit_loss" not in line, "caught inside the loss, after training started"
    assert not (run_dir / "model").exists()


def test_bad_truncation_value(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    err = error_text(fail(capsys, fit_args(tiny_overrides, run_dir, "--data.init_args.truncation=chop")))
    assert "truncation" in err and "chop" in err
    assert not (run_dir / "model").exists()


def test_missing_model_directory(capsys, tmp_path, tiny_overrides):
    run_dir, missing = tmp_path / "run", tmp_path / "no_model"
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, f"--model.policy.name_or_path={missing}")))
    assert str(missing) in line
    assert not (run_dir / "model").exists()


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_dir_with_a_finished_model_is_not_overwritten(capsys, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    model = run_dir / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama", "old": true}')
    (model / "model.safetensors").write_bytes(b"old weights")
    (run_dir / "metrics.json").write_text('{"old": true}')
    before = digest(run_dir)
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir)))
    assert "RunExistsError" in line and str(run_dir) in line
    assert digest(run_dir) == before  # nothing written, nothing replaced


def test_collect_refuses_a_finished_run_dir(capsys, tmp_path):
    run_dir = tmp_path / "collect"
    run_dir.mkdir()
    (run_dir / "preferences.jsonl").write_text('{"prompt": "old", "chosen": "a", "rejected": "b"}\n')
    (run_dir / "metrics.json").write_text('{"pairs": 1}')
    before = digest(run_dir)
    line = alignkit_error(fail(capsys, ["collect", f"--policy={tmp_path / 'policy'}",
                                        "--task=alignkit_plugins.tasks.SentimentTask", "--run_dir", run_dir]))
    assert "RunExistsError" in line and str(run_dir) in line
    assert digest(run_dir) == before


def test_qlora_without_bitsandbytes_is_one_line_naming_the_extra(capsys, tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is not installed
    run_dir = tmp_path / "run"
    line = alignkit_error(fail(capsys, fit_args(tiny_overrides, run_dir, "--model.policy.lora={r: 4}",
                                                "--model.policy.quantization=4bit")))
    assert "ConfigError: model.quantization='4bit' needs bitsandbytes" in line
    assert "pip install 'alignkit[qlora]'" in line
    assert not (run_dir / "model").exists()


def test_a_run_failing_before_its_first_step_leaves_no_wandb_run(capsys, tmp_path, tiny_overrides):
    """Lightning creates every logger's experiment at set-up, before the data loads: a bad data file left an empty
    wandb run behind (#21 item 9)."""
    run_dir = tmp_path / "run"
    path = write_jsonl(tmp_path / "wrong_columns.jsonl", [{"question": "review : the tea", "answer": "nice tea"}])
    with_wandb = [arg for arg in tiny_overrides if not arg.startswith("--wandb")]
    alignkit_error(fail(capsys, [*fit_args(with_wandb, run_dir, f"--data.init_args.path={path}"), "--wandb=true"]))
    assert not (run_dir / "wandb").exists()


def test_the_wandb_run_starts_with_the_first_step_and_holds_the_hyperparameters_until_then(tmp_path):
    from alignkit.run import RunWandbLogger

    logger = RunWandbLogger(project="alignkit", save_dir=str(tmp_path), offline=True)
    assert not hasattr(logger, "experiment")  # so Lightning's set-up does not create it
    logger.log_hyperparams({"lr": 0.1})
    assert not (tmp_path / "wandb").exists() and logger._experiment is None
    logger.log_metrics({"train/loss": 1.0}, step=1)
    try:
        assert logger.experiment.config["lr"] == 0.1 and (tmp_path / "wandb").is_dir()
    finally:
        logger.experiment.finish()
