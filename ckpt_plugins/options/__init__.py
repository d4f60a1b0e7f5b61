"""One options model: small frozen, validated groups per concern, and :class:`ManagerOptions`.

Users write flags in Python (``keep_last=3``), YAML (``async_save: true``) or on a command line
(``--ckpt_keep_last 3``); adapters map their framework's names onto these groups and nothing else,
so the same name means the same thing, with the same default and the same checks, everywhere.
The groups check every value when built (:mod:`.checks`) and never rewrite one.
"""

from ckpt_plugins.errors import ConfigError, renamed_options
from ckpt_plugins.options.groups import (
    DistributedOptions,
    IOOptions,
    PreemptionOptions,
    RestoreOptions,
    RetentionOptions,
    SaveOptions,
)
from ckpt_plugins.options.memory import MemoryTierOptions
from ckpt_plugins.options.mirror import MirrorOptions
from ckpt_plugins.options.model import ManagerOptions

__all__ = [
    "ConfigError",
    "DistributedOptions",
    "IOOptions",
    "ManagerOptions",
    "MemoryTierOptions",
    "MirrorOptions",
    "PreemptionOptions",
    "RestoreOptions",
    "RetentionOptions",
    "SaveOptions",
    "renamed_options",
]
