"""Files and folders a run writes are as readable as any other file the user makes (the umask decides: 0644 /
0755 under the usual 022), not private to the user as temporary files are (0600 / 0700)."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_file_and_folder_of_a_run_follows_the_umask(sft_run: Path):
    mask = umask()
    paths = [sft_run, *sft_run.rglob("*")]
    assert any(p.is_dir() and p.name == "model" for p in paths) and any(p.name == "metrics.json" for p in paths)
    wrong = [(str(p.relative_to(sft_run)), oct(p.stat().st_mode & 0o777)) for p in paths
             if not p.is_symlink() and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask
             and "wandb" not in p.parts]
    assert not wrong, f"umask {oct(mask)}: {wrong}"


def test_the_dpo_reference_cache_follows_the_umask(tmp_path: Path):
    import torch

    from alignkit_plugins.dpo.algorithm import save_atomic

    save_atomic({"logps": torch.zeros(3)}, tmp_path / "cache" / "reference_logps.pt")
    target = tmp_path / "cache" / "reference_logps.pt"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()
    assert torch.equal(torch.load(target, weights_only=True)["logps"], torch.zeros(3))
    assert [p.name for p in target.parent.iterdir()] == ["reference_logps.pt"]
