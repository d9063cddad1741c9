"""Evaluation: ``selfspec eval`` measures HF generate, prompt lookup, assisted generation and the
selfspec engine (without and with a drafter) on the same MT-bench / Spec-Bench prompts.

Modules: ``questions`` (file format, prompts), ``methods`` (one call per method, exactness
diagnosis), ``measure`` (timers, memory, environment), ``runner`` (the interleaved loop, resume),
``metrics`` (aggregates), ``results`` (on-disk layout and the results.json schema), ``report``
(markdown and plots), ``tracking`` (W&B), ``cli``.
"""
