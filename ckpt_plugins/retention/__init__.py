"""Retention: which committed checkpoints to keep, as pure rule objects (see :mod:`.policy`)."""

from ckpt_plugins.retention.policy import (
    CheckpointRecord, KeepAll, KeepBest, KeepBestOne, KeepEveryNSteps, KeepLast, KeepLatest, KeepProtected,
    KeepTimeInterval, RetentionContext, RetentionDecision, RetentionPolicy, RetentionRule, best_step, build_policy,
    policy_for, ranked_steps,
)

__all__ = [
    "CheckpointRecord", "KeepAll", "KeepBest", "KeepBestOne", "KeepEveryNSteps", "KeepLast",
    "KeepLatest", "KeepProtected", "KeepTimeInterval", "RetentionContext", "RetentionDecision",
    "RetentionPolicy", "RetentionRule", "best_step", "build_policy", "policy_for", "ranked_steps",
]
