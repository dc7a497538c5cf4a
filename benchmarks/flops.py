"""Model FLOPs of a step (PaLM appendix B convention, counted on the real tokens; padding is waste and counts
nothing).

``N`` is the number of weights used in matrix products per token, i.e. every parameter but the input
embedding, plus the LM head's ``V·H`` when it is tied to the embedding (a reward model has no LM head);
``L`` layers, ``H`` hidden size, ``T`` the padded length of the batch::

    forward(n tokens)  F = 2·N·n + 4·L·H·T·n       (weights + attention scores QKᵀ and A·V)
    training           3·F                          (forward + backward = 2·forward)
    offline (SFT, RM)  3·F(batch)
    + a reference      3·F(2B rows) + F(2B rows)    (DPO: the reference forward when it is live)
                       (RM and DPO with ``shared_prompt``: F over the B shared-prompt rows, each prompt once)
    online (PPO/RLOO)  F(prompts) + F(generated) + F_policy(seq) + F_ref(seq) + F_rm(seq) + E·3·F(seq)

The online count is the work the algorithm needs: generation, one policy forward for log π_old and the
values, one reference forward (when the algorithm ``needs_reference``), one reward-model forward and ``E``
update epochs; anything else an implementation executes (e.g. a second forward over the rollout for its
log-probs) lowers its MFU instead. Which formula applies is what the stage's algorithm class declares
(``online``, ``needs_reference``), not its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit_benchmarks.sizes import Workload
from alignkit_benchmarks.stages import algorithm_class


@dataclass
class ModelShape:
    """What the FLOP formulas need to know about a model."""

    params: int  # all parameters
    matmul_params: int  # N: weights used in matrix products per token (LM head included, input embedding not)
    layers: int
    hidden: int
    vocab: int

    def forward(self, tokens: float, length: float) -> float:
        """FLOPs of a forward pass over ``tokens`` real tokens in sequences padded to ``length``."""
        return 2.0 * self.matmul_params * tokens + 4.0 * self.layers * self.hidden * length * tokens


def model_shape(model) -> ModelShape:
    """Parameter counts of a transformers model (unwrapping peft), for the FLOP formulas."""
    from alignkit.ops import unwrap_peft

    base = unwrap_peft(model)
    config = base.config
    embedding = base.get_input_embeddings().weight
    params = sum(p.numel() for p in base.parameters())
    matmul = params - embedding.numel()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and head.weight is embedding:  # tied: the head's product runs, its weight is counted once
        matmul += embedding.numel()
    return ModelShape(params, matmul, config.num_hidden_layers, config.hidden_size, config.vocab_size)


def step_flops(stage: str, step: dict[str, float], shape: ModelShape, rm: ModelShape, work: Workload,
               reference: str = "live") -> float:
    """Model FLOPs of one step of ``stage`` from its token counts (formulas in the module docstring); with
    ``shared_prompt`` the tokens of the shared-prompt rows count (each prompt once)."""
    algorithm = algorithm_class(stage)
    real, length = step.get("tokens/real", 0.0), step.get("tokens/length", 0.0)
    if "tokens/computed" in step:
        real, length = step["tokens/computed"], step["tokens/computed_length"]
    forward = shape.forward(real, length)
    if not algorithm.online:
        return 3 * forward + (forward if algorithm.needs_reference and reference == "live" else 0.0)
    prompt, generated = step.get("tokens/prompt", 0.0), step.get("tokens/generated", 0.0)
    prompt_length = step.get("tokens/prompt_length", length)
    generation = shape.forward(prompt, prompt_length) + shape.forward(generated, length)
    experience = forward + (forward if algorithm.needs_reference else 0.0) + rm.forward(real, length)
    return generation + experience + work.update_epochs * 3 * forward
