"""Frozen models (the reference policy, reward models) keep their linear weights in the autocast dtype.

Under mixed precision, autocast casts every linear weight to bf16 (or fp16) at every forward, because trained
weights change between steps. A frozen model's weights never change, so the cast can be done once: its
``nn.Linear`` weights and biases are stored in the compute dtype from the start. Under autocast the results are
bit-for-bit the same (autocast would have produced exactly these rounded copies, and leaves a weight that is
already in its dtype alone); each forward skips one cast of the model, and the frozen model's linear weights take
half the memory.

The model's other floating-point tensors are copied into memory of their own. ``from_pretrained`` maps the
checkpoint file into memory and its tensors read from that mapping; the pages a forward touches stay resident for
as long as any tensor of the file lives, so converting only the linear weights would add the bf16 copies to the
float32 pages instead of replacing them.

Only plain floating-point ``nn.Linear`` weights change dtype. Embeddings, norms and any linear weight shared with
another module (a tied LM head is the embedding matrix) keep their dtype: their values enter computations that
autocast runs in float32. A linear layer called outside autocast (not in alignkit's training, validation or
rollout steps, but possibly in user code) casts its input to the stored dtype and its output back to float32, so
it still runs, at the lower precision.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def _input_to_weight_dtype(module: nn.Linear, args: tuple) -> tuple | None:
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) or x.dtype == module.weight.dtype:
        return None
    return (x.to(module.weight.dtype), *args[1:])


def _output_to_float32(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    if torch.is_autocast_enabled(output.device.type) or output.dtype == torch.float32:
        return None
    return output.float()


def store_in_compute_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the float32 weights and biases of ``model``'s unshared ``nn.Linear`` layers in ``dtype`` (the
    autocast dtype), for a model that is never trained. Returns how many layers changed; idempotent (a
    converted weight is no longer float32)."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    changed = 0
    for m in model.modules():
        if not isinstance(m, nn.Linear) or m.weight.dtype != torch.float32 or m.weight.requires_grad:
            continue
        if owners[id(m.weight)] > 1:  # shared, e.g. a tied LM head is the embedding matrix
            continue
        m.to(dtype)
        m.register_forward_pre_hook(_input_to_weight_dtype)
        m.register_forward_hook(_output_to_float32)
        changed += 1
    if changed:
        _own_memory(model)
    return changed


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy each float32 parameter and buffer of ``model`` into a tensor of its own, so that no tensor keeps the
    checkpoint's file mapping (and the pages read from it) alive. A parameter shared by two modules (a tied LM
    head) is one ``Parameter`` object, copied once, and stays shared."""
    for param in model.parameters():  # each Parameter object once, however many modules share it
        if type(param) is nn.Parameter and param.dtype == torch.float32:
            param.data = param.data.clone()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.dtype == torch.float32:
                module._buffers[name] = buffer.clone()
