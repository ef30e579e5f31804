"""Capacity and cost planning: memory by component and tier, bytes per token, tokens/s bounds and
expected values, dollars per million tokens (`planner.py`), on built-in or measured hardware
(`hardware.py`); table, JSON and plots (`report.py`). The planner reads configs and measurements
only; probes import the model lazily to time it."""

from .hardware import PROFILES, EngineCosts, Hardware, custom_hardware, get_profile, probe_hardware
from .planner import API_PRICES, PlanError, PlanInputs, monthly_cost, plan

__all__ = ["API_PRICES", "PROFILES", "EngineCosts", "Hardware", "PlanError", "PlanInputs", "custom_hardware",
           "get_profile", "monthly_cost", "plan", "probe_hardware"]
