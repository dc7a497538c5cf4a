"""Writing the trained policy as a Hugging Face model folder (``save_pretrained``), LoRA adapters merged."""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import Tensor

from alignkit.models.loading import load_model


def export_model(module, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
    """Write ``module``'s trained model (an ``AlignModule``'s policy) and tokenizer with ``save_pretrained``, LoRA
    adapters merged.

    ``state_dict``: the policy's full weights when a sharded strategy holds them spread over the ranks
    (:func:`alignkit.distributed.full_state_dict`, gathered before rank 0 calls this). A sharded LoRA policy is
    rebuilt unsharded on this rank from them, and its adapters merged there."""
    model, config, head = module.policy, module.policy_config, module.algorithm.model_head
    if hasattr(model, "merge_and_unload"):
        if state_dict is not None:
            model = load_model(config, head)[0]
            model.load_state_dict(state_dict)
            state_dict = None
        elif config.quantization is not None:  # QLoRA: merge into the base loaded unquantized
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            adapters = get_peft_model_state_dict(model)
            model = load_model(replace(config, quantization=None), head)[0]
            set_peft_model_state_dict(model, adapters)
        else:
            model = copy.deepcopy(model)
        model = model.merge_and_unload()
    model.save_pretrained(path, state_dict=state_dict)
    module.tokenizer.save_pretrained(path)
