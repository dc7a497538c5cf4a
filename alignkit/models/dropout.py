"""Turn dropout off in a model, whatever its config says.

Online RL compares forward passes of the same weights: PPO's ratio ``π/π_old`` is exactly 1 before the first
optimiser step, and the KL to the reference is exactly 0 while the policy equals it. With dropout on, every
forward draws its own mask, so the ratio is noisy (0.987 at initialisation, with 1 % of the tokens clipped), and
so are π_old, the values and the KL penalty. Like TRL, alignkit disables dropout in every model it runs
(``model.disable_dropout``, on by default).
"""

from __future__ import annotations

from torch import nn

#: Attributes that transformers modules read as a float probability at forward time, passing them to
#: ``nn.functional.dropout`` or to the attention kernel instead of holding an ``nn.Dropout``: the attention's
#: ``attention_dropout`` (Llama, Qwen2, GPT-NeoX; OPT's ``dropout``, GPTBigCode's ``attn_dropout``), a layer's
#: ``dropout`` and ``activation_dropout`` (OPT, BART), ``hidden_dropout`` (Falcon, Bloom) and ``layerdrop``, the
#: probability of skipping a whole layer (OPT, BART).
PROBABILITY_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "activation_dropout", "hidden_dropout",
                          "layerdrop")


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, in place: ``p`` of each torch dropout module
    (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``...) and each non-zero float attribute named in
    :data:`PROBABILITY_ATTRIBUTES`. A forward in train mode then equals one in eval mode. The model's config
    keeps its dropout values, so an exported model is saved as it was configured.

    Returns how many modules and attributes were changed (0 when the model had no dropout).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p != 0.0:
            module.p = 0.0
            changed += 1
        for name in PROBABILITY_ATTRIBUTES:
            value = vars(module).get(name)  # plain attributes only: a submodule of that name is handled above
            if isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
                changed += 1
    return changed
