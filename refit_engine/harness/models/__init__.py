"""Models the benchmarks refit: Kimi K2 at any scale."""

from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout, kimi_k2_parameters

__all__ = ["KimiK2Config", "kimi_k2_layout", "kimi_k2_parameters"]
