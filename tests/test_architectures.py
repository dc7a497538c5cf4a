"""Every architecture people align: SFT, reward model, DPO and PPO (and each with LoRA) train a few steps on tiny
random GPT-2, GPT-NeoX (Pythia), Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text-only, and multimodal with its
text config nested), Phi-3 and OLMo 2 models, through the real ``AlignModule`` and Lightning; every stage's
``save_pretrained`` output loads in plain transformers and computes what the trained module computed. The fast
paths (the final layer at the read columns, the shared-prompt layout) apply or fall back, with the results of the
plain full forward either way.

The configs keep each family's distinctive parts: GPT-2's Conv1D and learned positions, NeoX's partial rotary and
parallel residual, Gemma's scaled embeddings, soft-capping and mixed full/sliding-window layers (dict masks), Mistral's
and Phi-3's sliding window (4 positions, shorter than the sequences, so windows matter), Phi-3's fused projections,
Qwen3's and OLMo 2's query/key norms, OLMo 2's post-norms, grouped-query attention, tied and untied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import transformers
from conftest import preference_rows, write_jsonl
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import alignkit.models.final_layer as final_layer
from alignkit.data import PreferenceData, PromptData, SFTData
from alignkit.errors import PluginError
from alignkit.models import LoraSettings, ModelConfig, disable_dropout, sequence_scores
from alignkit.models.attention import attention_windows
from alignkit.models.final_layer import final_decoder_layer, last_columns
from alignkit.models.loading import context_length
from alignkit.module import AlignModule
from alignkit.ops import first_target_column, token_logprobs
from alignkit.pairs import check_shared_prompt, share_prompts
from alignkit.rollout import SamplingConfig
from alignkit.types import PreferenceBatch
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO
from alignkit_plugins.ppo.algorithm import policy_forward
from alignkit_plugins.reward_model import RewardModel
from alignkit_plugins.rewards import RewardModelReward
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

WINDOW = 4  # sliding window of the sliding-window layers: shorter than every test sequence
SHAPE = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=128)


@dataclass(frozen=True)
class Arch:
    config: str  # transformers config class
    options: dict
    final_layer: bool  # whether the final layer runs at the read columns only (else the whole layer)
    shaped: bool = True  # takes SHAPE's keyword names
    multimodal: dict | None = None  # a multimodal config's own options; SHAPE and `options` make its text_config


ARCHS = {
    "gpt2": Arch("GPT2Config", dict(n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=128), False, shaped=False),
    "gpt_neox": Arch("GPTNeoXConfig", dict(tie_word_embeddings=False), False),  # Pythia: partial rotary, parallel
    "llama": Arch("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=False), True),
    "mistral": Arch("MistralConfig", dict(num_key_value_heads=1, sliding_window=WINDOW), True),
    "qwen2": Arch("Qwen2Config", dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW,
                                      max_window_layers=1, tie_word_embeddings=True), True),  # full, then sliding
    "qwen3": Arch("Qwen3Config", dict(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True), True),
    "gemma2": Arch("Gemma2Config", dict(num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                        sliding_window=WINDOW), False),
    "gemma3": Arch("Gemma3TextConfig", dict(num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                            sliding_window=WINDOW,
                                            layer_types=["sliding_attention", "full_attention"]), False),
    # Gemma 3 4B and up: the text decoder's config nested in a multimodal one (AutoModelForCausalLM builds
    # Gemma3ForConditionalGeneration, with a vision tower that text-only training leaves alone)
    "gemma3_multimodal": Arch("Gemma3Config", dict(num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                                   sliding_window=WINDOW,
                                                   layer_types=["sliding_attention", "full_attention"]), False,
                              multimodal=dict(vision_config=dict(hidden_size=16, intermediate_size=32, image_size=28,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 patch_size=14), mm_tokens_per_image=4)),
    "phi3": Arch("Phi3Config", dict(sliding_window=WINDOW, tie_word_embeddings=False), False),
    "olmo2": Arch("Olmo2Config", dict(tie_word_embeddings=False), False),
}
MIXED_LAYERS = {"qwen2", "gemma2", "gemma3", "gemma3_multimodal"}  # full and sliding-window layers in one model
TASK = SentimentTask(num_train_prompts=8, num_eval_prompts=2)
LORA = LoraSettings(r=2, alpha=4)
TEXTS = ["review : the pizza at the diner on monday the pizza was great", "review : the soup was cold"]


def trainer(root: Path, steps: int = 2) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=root)


def fit(folder: Path, data, source: Path, algorithm, lora: bool = False, steps: int = 2,
        **kwargs) -> tuple[AlignModule, Path]:
    """One stage: ``steps`` optimiser steps from the model at ``source``, exported to ``folder``; the trained module
    and ``folder``."""
    L.seed_everything(0)
    policy = ModelConfig(name_or_path=str(source), lora=LORA if lora else None)
    module = AlignModule(algorithm=algorithm, policy=policy, **kwargs)
    module.optimizer_config.lr = 1e-2
    data.attach(module.tokenizer)
    before = {k: v.detach().clone() for k, v in module.policy.named_parameters() if v.requires_grad}
    trainer(folder.with_name(f"{folder.name}-trainer"), steps).fit(module, datamodule=data)
    assert module.global_step == steps
    assert any(not torch.equal(before[k], v) for k, v in module.policy.named_parameters() if k in before)
    module.export(str(folder))
    return module, folder


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory, tiny_tokenizer):
    """The architecture's name, its config, and the trained module and exported folder of each stage: SFT from the
    random tiny model (saved with the tiny tokenizer), then RM, DPO and PPO from the SFT model, each also with LoRA
    adapters (``*_lora``; PPO scores with the RM of its variant). LoRA on SFT trains the causal LM as DPO's does."""
    name, spec = request.param, ARCHS[request.param]
    config_class = getattr(transformers, spec.config, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {spec.config}")
    tok = tiny_tokenizer
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    options = dict(vocab_size=len(tok), **(SHAPE if spec.shaped else {}), **spec.options, **ids)
    config = config_class(**options) if spec.multimodal is None else config_class(text_config=options,
                                                                                  **spec.multimodal, **ids)
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    prefs = write_jsonl(root / "prefs.jsonl", preference_rows(8))

    def preferences() -> PreferenceData:
        return PreferenceData(path=str(prefs), batch_size=4, val_fraction=0)

    stages = {"sft": fit(root / "sft", SFTData(task=TASK, batch_size=4, val_fraction=0), root / "base", SFT())}
    for suffix, lora in (("", False), ("_lora", True)):
        stages["rm" + suffix] = fit(root / f"rm{suffix}", preferences(), root / "sft", RewardModel(), lora)
        stages["dpo" + suffix] = fit(root / f"dpo{suffix}", preferences(), root / "sft", DPO(beta=0.1), lora)
        stages["ppo" + suffix] = fit(root / f"ppo{suffix}", PromptData(task=TASK, batch_size=4, val_fraction=0),
                                     root / "sft", PPO(sampling=SamplingConfig(max_new_tokens=4), update_epochs=1),
                                     lora, rewards=[RewardModelReward(path=str(root / f"rm{suffix}"))])
    return name, config, stages


def encoded(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """TEXTS right padded: ``(2, T)`` ids and mask."""
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "rm_lora", "dpo_lora", "ppo_lora"])
def test_stage_output_reloads_in_transformers_and_computes_what_the_module_did(arch, stage):
    _, _, stages = arch
    module, folder = stages[stage]
    ids, mask = encoded(module.tokenizer)
    module.policy.eval()
    with torch.no_grad():
        if stage.startswith("rm"):
            reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            assert not any("lora" in k for k in reloaded.state_dict())
            expected = sequence_scores(module.policy, ids, mask)
            got = reloaded(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # transformers' own pooling
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert not any("lora" in k for k in reloaded.state_dict())
            expected = module.policy(input_ids=ids, attention_mask=mask).logits
            got = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(got).all() and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def random_pairs(vocab: int, seed: int = 0) -> PreferenceBatch:
    """Six preference pairs of random tokens, prompts of 2-8 and responses of 1-6 tokens (longer than WINDOW), in
    the concatenated layout that PreferenceData collates: chosen rows then rejected rows, right padded with 0."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(4, vocab, (length,), generator=generator).tolist()

    triples = [(tokens(2, 9), tokens(1, 7), tokens(1, 7)) for _ in range(6)]
    rows = [(p, c) for p, c, _ in triples] + [(p, r) for p, _, r in triples]
    width = max(len(p) + len(a) for p, a in rows)
    ids, mask, loss_mask = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        loss_mask[i, len(p): len(p) + len(a)] = 1
    return PreferenceBatch(input_ids=ids, attention_mask=mask, loss_mask=loss_mask, margin=torch.zeros(6),
                           index=torch.arange(6))


def fast_path_results(policy: torch.nn.Module, scorer: torch.nn.Module, batch: PreferenceBatch) -> dict[str, Tensor]:
    """What every fast path computes, each followed by the gradient of its sum of squares: the log-probs of the last
    columns (SFT), the scores read at the last tokens (RM), DPO's log-probs and the RM's pair scores in the
    concatenated and the shared-prompt layouts, and PPO's policy pass (log-probs, logits, hidden states of the response
    columns)."""
    ids, mask = batch.input_ids, batch.attention_mask
    keep = ids.shape[1] - first_target_column(batch.loss_mask) + 1
    with last_columns(policy, keep) as extra:
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
    results = {"sft": token_logprobs(logits[:, -keep:-1], ids[:, -keep + 1:]), "rm": sequence_scores(scorer, ids, mask)}
    for shared in (False, True):
        results[f"dpo shared={shared}"] = torch.stack(DPO(shared_prompt=shared).pair_logps(policy, batch))
        results[f"rm shared={shared}"] = torch.stack(RewardModel(shared_prompt=shared).pair_scores(scorer, batch))
    logprobs, logits, hidden = policy_forward(policy, ids, mask, 4, 0.7, need_hidden=True)
    results["ppo"] = torch.cat([logprobs.flatten(), logits.flatten(), hidden.flatten()])
    for name in list(results):  # one backward per result: the gradients agree too
        policy.zero_grad(), scorer.zero_grad()
        results[name].square().sum().backward(retain_graph=True)
        grads = [p.grad.flatten() for p in (*policy.parameters(), *scorer.parameters()) if p.grad is not None]
        results[name] = torch.cat([results[name].detach().flatten(), *grads])
    return results


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fast_paths_apply_or_fall_back_with_the_plain_forwards_results(arch, lora, monkeypatch):
    name, config, stages = arch
    suffix = "_lora" if lora else ""
    policy, scorer = stages["dpo" + suffix][0].policy, stages["rm" + suffix][0].policy
    for model in (policy, scorer):
        disable_dropout(model.train())
        assert (final_decoder_layer(model) is not None) == ARCHS[name].final_layer
        check_shared_prompt(model, name, needs_score_head=model is scorer)  # accepted: every architecture runs it
        assert context_length(model) == 128  # what `max_length: auto` caps at (in the nested text config of Gemma 3)
    batch = random_pairs(config.get_text_config().vocab_size)
    mixed = len(attention_windows(policy)) > 1  # full and sliding-window layers: one mask per kind of layer
    assert isinstance(share_prompts(batch).attention_mask_for(policy), dict) == mixed == (name in MIXED_LAYERS)
    fast = fast_path_results(policy, scorer, batch)
    monkeypatch.setattr(final_layer, "final_decoder_layer", lambda model: None)  # the whole final layer
    plain = fast_path_results(policy, scorer, batch)
    for key, value in fast.items():
        reference = plain[key.replace("shared=True", "shared=False")]  # the concatenated layout, whole layer
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, reference, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")


def test_shared_prompt_refuses_layers_a_mask_cannot_describe():
    model = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", "linear_attention"]))
    with pytest.raises(PluginError, match="'linear_attention'.*set shared_prompt=false"):
        check_shared_prompt(model, "dpo")
