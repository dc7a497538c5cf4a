"""Built-in default hook implementations, registered ``trylast`` in every run so that any plugin can
replace them (e.g. a vLLM rollout engine answering ``alignkit_rollout`` first)."""

from __future__ import annotations

from alignkit.distributed import full_parameters, full_state_dict, zero3  # noqa: F401  (their former home)
from alignkit.plugin import hookimpl
from alignkit.types import PromptBatch, Rollout


def rank_sampling_seed(seed: int, rank: int, step: int) -> int:
    """The seed of data-parallel rank ``rank``'s sampling generator at optimiser step ``step`` of a run seeded with
    ``seed``: a 63-bit hash of the three (numpy's ``SeedSequence``), so no two ranks or steps share a stream."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class DefaultRollout:
    """Samples with the policy through :func:`alignkit.rollout.generate`, using the algorithm's
    ``sampling`` settings (a :class:`~alignkit.rollout.SamplingConfig`).

    Every data-parallel rank must draw its own samples: ``seed_everything`` gives each rank the same global random
    stream, so the same prompt on two ranks would get the same response. Rank 0 samples from the global stream (a
    single-process run is what it always was, and its resume restores that stream); rank ``r > 0`` from a generator
    seeded at each step by :func:`rank_sampling_seed` ``(seed, r, step)``, so it has no state to checkpoint and a
    resumed run draws what an uninterrupted one would."""

    @hookimpl(trylast=True)
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout:
        import os

        import torch

        from alignkit.rollout import generate

        sampling = module.algorithm.sampling  # declared by `OnlineAlgorithm`
        batch = batch.to(module.device)
        generator = None
        if module.global_rank > 0:
            seed = rank_sampling_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), module.global_rank, module.global_step)
            generator = torch.Generator(device=module.device).manual_seed(seed)
        with full_parameters(module):
            return generate(module.policy, module.tokenizer, batch.input_ids, batch.attention_mask, batch.prompts,
                            sampling, generator)


DEFAULTS = [DefaultRollout()]
