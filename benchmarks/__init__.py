"""``alignkit bench``: throughput, memory and MFU of the SFT, reward-model, DPO and PPO stages (installed as
``alignkit_benchmarks``; the ``bench`` command is registered in the ``alignkit.commands`` entry-point group).

For every model size and stage one *measurement* trains a few steps through the real code path (the
:class:`~alignkit.module.AlignModule` under a Lightning ``Trainer``, the plugins, the data modules) and
records

- time per step (an online step is one rollout → score → experience → update iteration), with the
  phases of an online step (generation, scoring, experience, update) timed by a pluggy wrapper plugin
  (:mod:`~alignkit_benchmarks.hook_timer`), on the wall clock and on the process CPU clock (with one thread on a
  shared CPU the CPU clock counts this process's own work only; keys ending in ``_cpu``);
- training tokens/s (real, non-pad tokens through forward + backward) and, online, generation tokens/s;
- the fraction of pad tokens in the batches (padding waste);
- peak memory: on CPU the growth of the process's maximum resident set size (``getrusage``) above the
  resident size after the imports, measured in a fresh subprocess per measurement (``isolate``); on GPU
  ``torch.cuda.max_memory_allocated``;
- model FLOPs per step (:mod:`~alignkit_benchmarks.flops`) and MFU against a roofline measured in the same run,
  on the same device and dtype (:mod:`~alignkit_benchmarks.roofline`).

Modules:

========================= ===========================================================================
``command``               the ``bench`` command: the loop over sizes, stages, frameworks and repeats
``sizes``                 model sizes (named :class:`~alignkit.models.TinyModelConfig` values), the workload
``stages``                the benchmarked stages: a table of algorithm plugins and their settings
``assets``                the saved policy, reward model and synthetic data every framework reads
``recorder``              per-step times and token counts on two clocks
``hook_timer``            the pluggy wrapper plugin that times every hook call
``alignkit_runner``       one alignkit measurement (AlignModule under a Lightning Trainer)
``trl_compare``           one TRL measurement on the same model, data and lengths (``--compare='[trl]'``)
``measure``               one measurement in a fresh subprocess (clean memory high-water mark)
``results``               FLOPs, throughput, MFU, medians over repeats, ours/theirs ratios
``flops``, ``roofline``   the FLOP formulas and the matmul rooflines
``memory``                resident-set-size probes
``report``                result JSON → Markdown tables (``python -m alignkit_benchmarks.report``)
========================= ===========================================================================

Method, results and the optimisations measured with it: ``benchmarks/README.md``.
"""
