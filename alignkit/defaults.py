"""Built-in default hook implementations, registered ``trylast`` in every run so that any plugin can
replace them (e.g. a vLLM rollout engine answering ``alignkit_rollout`` first)."""

from __future__ import annotations

from alignkit.plugin import hookimpl
from alignkit.types import PromptBatch, Rollout


class DefaultRollout:
    """Samples with the policy through :func:`alignkit.rollout.generate`, using the algorithm's
    ``sampling`` settings (a :class:`~alignkit.rollout.SamplingConfig`)."""

    @hookimpl(trylast=True)
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout:
        from alignkit.rollout import SamplingConfig, generate

        sampling = getattr(module.algorithm, "sampling", None) or SamplingConfig()
        batch = batch.to(module.device)
        return generate(module.policy, module.tokenizer, batch.input_ids, batch.attention_mask, batch.prompts, sampling)


DEFAULTS = [DefaultRollout()]
