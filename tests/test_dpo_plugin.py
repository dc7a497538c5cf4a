"""The DPO algorithm plugin on a tiny Llama: concatenated forward, loss at initialisation, precomputed
reference log-probs (cache file, freed reference, checkpoint resume), end-to-end fits and the recipe."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from alignkit.data import PreferenceData
from alignkit.models.loading import ModelConfig
from alignkit.models.tiny import TinyModelConfig, build_tiny_model
from alignkit.module import AlignModule, OptimizerConfig
from alignkit.ops import token_logprobs
from alignkit_plugins.dpo import DPO, concatenated_logps
from alignkit_plugins.dpo.algorithm import REFERENCE_CACHE_FILE, reference_logps_table
from alignkit_plugins.dpo.losses import sequence_logps

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dpo.yaml"
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)

FOODS = ["burrito", "taco", "pizza", "soup", "salad", "curry", "ramen", "waffle"]
PLACES = ["cafe", "pub", "diner", "canteen", "bistro", "deli", "grill", "market"]
DAYS = ["monday", "tuesday", "friday", "sunday"]


@pytest.fixture
def preferences(tmp_path: Path) -> Path:
    """Eight pairs in the explicit format that `alignkit collect` writes, responses of varied length."""
    rows = []
    for i, (food, place) in enumerate(zip(FOODS, PLACES)):
        rows.append({
            "prompt": f"review : the {food} at the {place} on {DAYS[i % 4]}",
            "chosen": " it was great and tasty" + " , really fresh" * (i % 3),
            "rejected": " bland" + " and cold" * (i % 2),
            "gold_chosen": 1.0, "gold_rejected": -1.0, "p_chosen": 0.9,
        })
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_module(**dpo_args) -> AlignModule:
    return AlignModule(algorithm=DPO(**dpo_args), policy=ModelConfig(name_or_path="tiny", tiny=TINY),
                       optimizer=OptimizerConfig(lr=1e-2))


def make_data(module: AlignModule, path: Path, val_fraction: float = 0.0) -> PreferenceData:
    data = PreferenceData(path=str(path), batch_size=4, max_length=48, max_prompt_length=24, val_fraction=val_fraction)
    data.attach(module.tokenizer)
    data.setup()
    return data


def first_batch(data: PreferenceData):
    return data.collate(data.train_set[:4])


def trainer(tmp_path: Path, max_steps: int = 3, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return L.Trainer(**{**options, **kwargs})


def separate_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Reference implementation for one group of rows, trimmed to their own longest real length."""
    length = int(attention_mask.sum(-1).max())
    ids, mask, lm = input_ids[:, :length], attention_mask[:, :length], loss_mask[:, :length]
    logits = model(input_ids=ids, attention_mask=mask).logits
    return sequence_logps(token_logprobs(logits[:, :-1], ids[:, 1:]), lm[:, 1:], False)


@torch.no_grad()
def test_concatenated_forward_matches_separate_passes(preferences):
    module = make_module()
    model = module.policy.eval()
    batch = first_batch(make_data(module, preferences))
    B = batch.num_pairs
    chosen, rejected = concatenated_logps(model, batch)
    assert chosen.shape == rejected.shape == (B,)
    sep_chosen = separate_logps(model, batch.input_ids[:B], batch.attention_mask[:B], batch.loss_mask[:B])
    sep_rejected = separate_logps(model, batch.input_ids[B:], batch.attention_mask[B:], batch.loss_mask[B:])
    torch.testing.assert_close(chosen, sep_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, sep_rejected, atol=1e-5, rtol=0)
    # Each row alone, unpadded, scored token by token: the shift pairs logits[t-1] with token t.
    for row, value in enumerate(torch.cat([chosen, rejected])):
        real = batch.attention_mask[row].bool()
        ids, lm = batch.input_ids[row][real], batch.loss_mask[row][real]
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
        expected = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if lm[t])
        assert lm.sum() > 0 and abs(float(value) - float(expected)) < 1e-5
    # Length normalisation divides by the number of response tokens.
    mean_chosen, _ = concatenated_logps(model, batch, length_normalize=True)
    torch.testing.assert_close(mean_chosen, chosen / batch.loss_mask[:B, 1:].sum(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    ("sigmoid", 0.0, math.log(2)), ("cdpo", 0.2, math.log(2)), ("robust", 0.2, math.log(2)),
    ("ipo", 0.0, (1 / (2 * 0.1)) ** 2), ("hinge", 0.0, 1.0),
])
def test_loss_at_initialisation(preferences, loss_type, smoothing, expected):
    module = make_module(beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    batch = first_batch(make_data(module, preferences))
    out = module.algorithm.alignkit_loss(module=module, batch=batch)  # policy == reference
    assert float(out.loss) == pytest.approx(expected, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(out.stats[key]) == pytest.approx(0.0, abs=1e-6), key
    assert float(out.stats["logps/chosen"]) < 0 and float(out.stats["logps/rejected"]) < 0
    assert all(not torch.is_tensor(v) or not v.requires_grad for v in out.stats.values())
    out.loss.backward()  # the gradient reaches the policy only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
    assert all(p.grad is None for p in module.reference.parameters())


@torch.no_grad()
def test_precomputed_reference_logps_equal_live(preferences):
    module = make_module()
    data = make_data(module, preferences, val_fraction=0.25)
    loaders = [data.train_dataloader(), data.val_dataloader()]
    chosen, rejected = reference_logps_table(module.reference, loaders, "cpu")
    train_index = {int(i) for b in loaders[0] for i in b.index}
    val_index = {int(i) for b in loaders[1] for i in b.index}
    assert val_index and not train_index & val_index  # one index space: rows numbered before the hold-out
    assert train_index | val_index == set(range(8)) and chosen.shape == rejected.shape == (8,)
    for loader in loaders:
        for batch in loader:
            live_chosen, live_rejected = concatenated_logps(module.reference, batch)
            torch.testing.assert_close(chosen[batch.index], live_chosen, atol=1e-5, rtol=0)
            torch.testing.assert_close(rejected[batch.index], live_rejected, atol=1e-5, rtol=0)


def test_fit_live_updates_policy_not_reference(preferences, tmp_path):
    module = make_module()
    data = PreferenceData(path=str(preferences), batch_size=4, max_length=48, max_prompt_length=24, val_fraction=0.0)
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    trainer(tmp_path).fit(module, datamodule=data)
    assert any(not torch.equal(v, module.policy.state_dict()[k]) for k, v in policy_before.items())
    assert all(torch.equal(v, module.reference.state_dict()[k]) for k, v in reference_before.items())
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "train/loss"} <= set(trainer_metrics(module))
    # Gradients are freed right after each optimiser step, not held until the next step's forward.
    assert all(p.grad is None for p in module.parameters())


def trainer_metrics(module) -> dict:
    return dict(module.trainer.callback_metrics)


def test_fit_precompute_caches_frees_reference_and_resumes(preferences, tmp_path):
    data = PreferenceData(path=str(preferences), batch_size=4, max_length=48, max_prompt_length=24, val_fraction=0.25)
    module = make_module(reference_logps="precompute")
    with torch.no_grad():
        expected = reference_logps_table(module.reference,
                                         [make_data(module, preferences, 0.0).train_dataloader()], "cpu")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # The validation sanity check sees the first batch: the table is computed there, under inference mode.
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(module, datamodule=data)
    cache = torch.load(tmp_path / REFERENCE_CACHE_FILE)
    torch.testing.assert_close(cache["chosen"], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["rejected"], expected[1], atol=1e-5, rtol=0)
    assert module.reference is None  # single device: the frozen copy is freed after precomputing
    assert "val/rewards/accuracies" in trainer_metrics(module)

    # Resume from the checkpoint: the checkpoint has no reference weights; the new module drops its copy
    # before the strict state-dict load, and the table comes back from the checkpoint.
    resumed = make_module(reference_logps="precompute")
    run = trainer(tmp_path, max_steps=3, enable_checkpointing=True,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "c2")])
    run.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert run.global_step == 3 and resumed.reference is None

    # A fresh run pointed at the cache file reuses it: it never needs a reference model.
    fresh = make_module(reference_logps="precompute", cache_dir=str(tmp_path))
    fresh.reference = None  # computing the table would now raise
    trainer(tmp_path / "fresh", max_steps=1).fit(fresh, datamodule=data)
    assert fresh.trainer.global_step == 1


def test_recipe_runs_through_cli(preferences, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.cli import main

    model, tokenizer = build_tiny_model(TINY)
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    run = tmp_path / "run"
    main(["fit", "--config", str(RECIPE), "--wandb=false", "--run_dir", str(run), "--trainer.max_steps=2",
          f"--model.policy.name_or_path={tmp_path / 'sft'}", f"--data.init_args.path={preferences}",
          "--data.init_args.batch_size=4", "--data.init_args.val_fraction=0.25", "--trainer.log_every_n_steps=1"])
    assert isinstance(AutoModelForCausalLM.from_pretrained(run / "model"), torch.nn.Module)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["algorithm"] == "DPO" and metrics["global_step"] == 2
    assert "rewards/accuracies" in metrics["final"] and "val/rewards/accuracies" in metrics["final"]
