"""Online (per-batch) sample selection policies. Importing this package registers them all."""

from subsetsel.online import baselines, echoing, importance, selective_backprop  # noqa: F401
from subsetsel.online.base import Batch, Policy, create_policy, policy_names, register_policy

__all__ = ["Batch", "Policy", "create_policy", "policy_names", "register_policy"]
