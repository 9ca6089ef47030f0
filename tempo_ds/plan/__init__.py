"""The planner: the largest micro-batch that fits, per variant, predicted on a CPU before any GPU
step (python -m tempo_ds.plan; docs/plan.md). estimate() is its Python API."""
from .estimate import Plan, PlanError, VariantPlan, estimate

__all__ = ["Plan", "PlanError", "VariantPlan", "estimate"]
