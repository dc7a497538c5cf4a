"""One measurement, in a fresh Python process when isolated (a clean memory high-water mark per measurement)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def resolve_runner(framework: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if framework.startswith("alignkit"):
        from alignkit_benchmarks.alignkit_runner import run_alignkit

        return run_alignkit
    if framework == "trl":
        from alignkit_benchmarks.trl_compare import run_trl

        return run_trl
    raise ValueError(f"unknown framework {framework!r}")


def _child_env(threads: int | None = None, mmap_threshold: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if mmap_threshold:  # glibc: blocks above this are mmap'ed and returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env.update({"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                "PYTHONWARNINGS": "ignore", "DISABLE_MLFLOW_INTEGRATION": "TRUE", "TQDM_DISABLE": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    return env


def measure(spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run one measurement, in a fresh Python process when ``isolate`` (clean memory high-water mark)."""
    if not isolate:
        return _measure_here(spec)
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        child = "import sys; from alignkit_benchmarks.measure import child_main; child_main(sys.argv[1], sys.argv[2])"
        command = [sys.executable, "-c", child, str(spec_path), str(out_path)]
        proc = subprocess.run(command, env=_child_env(spec.get("threads"), spec.get("mmap_threshold")),
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            return {"error": f"measurement failed (exit {proc.returncode}):\n{tail}"}
        return json.loads(out_path.read_text())


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        return resolve_runner(spec["framework"])(spec)
    except ImportError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _import_framework(framework: str) -> None:
    """Import what a measurement will use, so that module imports (lazy ones included) are not counted as
    training memory on either side."""
    import datasets  # noqa: F401  (alignkit imports it lazily to read data files, TRL needs it)
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401

    if framework == "trl":
        with contextlib.suppress(ImportError):
            import trl

            for name in ("DPOTrainer", "RewardTrainer", "RLOOTrainer", "SFTTrainer"):
                getattr(trl, name)
    else:
        import transformers.optimization  # noqa: F401  (alignkit imports get_scheduler when it builds the optimiser)

        import alignkit.data  # noqa: F401
        import alignkit.module  # noqa: F401
        from alignkit_benchmarks.stages import ONLINE_REWARD, STAGES, load_plugin

        for plugin in [*(stage.plugin for stage in STAGES.values()), ONLINE_REWARD]:  # every stage's plugin module
            load_plugin(plugin)


def child_main(spec_path: str, out_path: str) -> None:
    """Entry point of a measurement subprocess: read the spec, measure, write the result."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    spec = json.loads(Path(spec_path).read_text())
    _import_framework(spec["framework"])  # imports first: the baseline RSS is measured after them
    result = _measure_here(spec)
    Path(out_path).write_text(json.dumps(result))
