"""The GPU check and the step-cost benchmark.

``bench`` (Stage-2 / Stage-1 step time and memory, training iterations per mode: ``python -m tcm_core bench``),
``cases`` (each check on synthetic inputs), ``check`` (plan, budgets, running: ``python -m tcm_core gpu-check``)
and ``report`` (the check's Markdown and the README's cost rows).
"""
