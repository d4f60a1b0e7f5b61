"""Activation (gradient) checkpointing for any PyTorch model, Lightning and the HF Trainer.

Trade compute for memory by not keeping the activations of a model's repeated blocks for the
backward pass::

    from ckpt_plugins.activation import apply_activation_checkpointing
    report = apply_activation_checkpointing(model, {"mode": "selective"})
    print(report)

Modes (one class each, in :mod:`.modes`): ``"full"``, ``"every_n"``, ``"selective"``,
``"offload"``, ``"off"``. Blocks are found automatically or named by class or path glob
(:mod:`.targets`). Parameter names and state_dict keys never change. Hugging Face models use their
own mechanism when it can express the mode (:mod:`.hf`); other models get their blocks' ``forward``
replaced (:mod:`.wrapper`). Guards for BatchNorm, ``use_cache`` and frozen inputs are in
:mod:`.guards`. See ``docs/activation.md`` for the guide and benchmark.
"""

from ckpt_plugins.activation.apply import (
    activation_checkpointing_report,
    apply_activation_checkpointing,
    remove_activation_checkpointing,
)
from ckpt_plugins.activation.config import ActivationCheckpointing
from ckpt_plugins.activation.guards import ActivationCheckpointingWarning
from ckpt_plugins.activation.modes import SELECTIVE_SAVE_OPS, selective_policy
from ckpt_plugins.activation.report import ActivationCheckpointingReport, WrappedModule

__all__ = [
    "SELECTIVE_SAVE_OPS",
    "ActivationCheckpointing",
    "ActivationCheckpointingReport",
    "ActivationCheckpointingWarning",
    "WrappedModule",
    "activation_checkpointing_report",
    "apply_activation_checkpointing",
    "remove_activation_checkpointing",
    "selective_policy",
]
