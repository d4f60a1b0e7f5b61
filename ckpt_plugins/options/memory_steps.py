"""The adapters' spelling of the in-memory tier: ``memory_every_n_steps`` and ``persist_every_n_steps``.

Lightning's callback and the HF arguments take the same two names (HF: ``--ckpt_memory_every_n_steps``,
``--ckpt_persist_every_n_steps``) and translate them here, once, into the manager's ``memory_tier``
and ``persist_every_n_steps``: a save every M steps, each a memory snapshot, the steps divisible by
K also persisted.
"""

from __future__ import annotations

from typing import Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_positive_int
from ckpt_plugins.options.memory import memory_options_of

__all__ = ["memory_kwargs"]


def memory_kwargs(memory_every_n_steps: Any, persist_every_n_steps: Any, every_n_steps: Any) -> dict[str, Any]:
    """The manager keywords for ``memory_every_n_steps=M``, ``persist_every_n_steps=K``.

    Args:
        every_n_steps: the adapter's own step trigger (Lightning's ``every_n_train_steps``, HF's
            ``save_steps`` when the user set it), which M replaces: both is an error.

    Raises:
        ConfigError: M or K not a positive int, K without M, K not a multiple of M (those steps
            would never be saved), or M beside the adapter's own step trigger.
    """
    check_positive_int("memory_every_n_steps", memory_every_n_steps, optional=True)
    check_positive_int("persist_every_n_steps", persist_every_n_steps, optional=True)
    if memory_every_n_steps is None:
        if persist_every_n_steps is not None:
            raise ConfigError(
                f"$persist_every_n_steps={persist_every_n_steps!r} needs $memory_every_n_steps (the in-memory "
                "tier); without it every save is persisted",
                option="persist_every_n_steps",
                value=persist_every_n_steps,
                mentions=("memory_every_n_steps",),
            )
        return {}
    if every_n_steps is not None:
        raise ConfigError(
            f"$memory_every_n_steps={memory_every_n_steps!r} is the step trigger with the in-memory tier; "
            f"drop the other one (every {every_n_steps} steps) and use $persist_every_n_steps for the "
            "saves that go to disk",
            option="memory_every_n_steps",
            value=memory_every_n_steps,
            mentions=("persist_every_n_steps",),
        )
    if persist_every_n_steps is not None and persist_every_n_steps % memory_every_n_steps:
        raise ConfigError(
            f"$persist_every_n_steps={persist_every_n_steps!r} must be a multiple of "
            f"$memory_every_n_steps={memory_every_n_steps!r}: other steps are never saved",
            option="persist_every_n_steps",
            value=persist_every_n_steps,
            mentions=("memory_every_n_steps",),
        )
    memory_options_of(True, persist_every_n_steps)
    return {"memory_tier": True, "persist_every_n_steps": persist_every_n_steps}
