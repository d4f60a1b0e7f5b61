"""The activation-checkpointing option, and the one function that turns user flags into it.

Users write the option in several shapes: ``gradient_checkpointing: true`` in a Lightning YAML,
``--activation_checkpointing selective`` on a command line, a dict with ``mode``/``targets``/
``every_n`` from a config file. :meth:`ActivationCheckpointing.from_value` converts each of these
once; everything after it sees only the dataclass.

The dataclass has plain typed fields (``Literal``, ``str | list[str]``, ``int``, ``bool``,
``bool | None``) so jsonargparse/LightningCLI and ``transformers.HfArgumentParser`` can build it
directly. Validation happens in ``__post_init__`` and never rewrites a field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ckpt_plugins.errors import ConfigError

Mode = Literal["full", "every_n", "selective", "offload", "off"]
MODE_NAMES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class ActivationCheckpointing:
    """Which blocks of a model to checkpoint, and how.

    Build it directly, or from a bool/str/dict with :meth:`from_value`; apply it with
    :func:`ckpt_plugins.activation.apply_activation_checkpointing`.

    Example:
        >>> ActivationCheckpointing.from_value(True).mode
        'full'
        >>> ActivationCheckpointing.from_value({"mode": "every_n", "every_n": 3}).every_n
        3
    """

    mode: Mode = "full"
    """How the chosen blocks trade compute for memory.

    ``"full"``: every block is checkpointed; only its inputs are kept and its forward is
    recomputed during backward. ``"every_n"``: like ``"full"`` but only blocks ``0, n, 2n, ...``
    (``every_n`` below), the others keep their activations. ``"selective"``: every block is
    checkpointed with a per-op policy that keeps the outputs of matmuls and attention and
    recomputes pointwise ops and norms. ``"offload"``: nothing is recomputed; the tensors a block
    saves for backward are moved to CPU memory (pinned when CUDA is available) and copied back
    during backward; on a CPU-only model this changes nothing. ``"off"``: leave the model alone."""

    targets: str | list[str] = "auto"
    """Which modules are the blocks.

    ``"auto"``: a Hugging Face model's decoder layers (its ``GradientCheckpointingLayer``
    modules), otherwise the repeated children of the largest ``nn.ModuleList``/``nn.Sequential``.
    Otherwise one or more patterns (a list, or one comma-separated string): a pattern matches a
    module whose class name equals it, or whose dotted path (as in ``named_modules()``) matches
    it as a glob, e.g. ``"GPT2Block"`` or ``"transformer.h.*"``. When a matched module lies
    inside another matched module only the outer one is used."""

    every_n: int = 2
    """For ``mode="every_n"``: checkpoint blocks whose index (in module order) is a multiple of
    this, i.e. ``0, n, 2n, ...`` (the same layers Hugging Face's ``every_n_layers`` picks).
    ``1`` is the same as ``"full"``. Ignored by other modes."""

    preserve_rng_state: bool = True
    """Stash and restore the RNG state around recomputation so dropout draws the same masks in
    the recomputed forward; gradients then equal those without checkpointing. Turn off only for
    models without randomness, to save the (small) cost of the stash."""

    offload_pin_memory: bool | None = None
    """For ``mode="offload"``: copy saved tensors into pinned host memory (faster, asynchronous
    device-to-host copies). ``None`` means auto: pin when CUDA is available. Ignored by other
    modes."""

    def __post_init__(self) -> None:
        if self.mode not in MODE_NAMES:
            raise ConfigError(
                f"activation checkpointing mode {self.mode!r} is not valid; "
                f"use one of {', '.join(repr(m) for m in MODE_NAMES)}."
            )
        if isinstance(self.every_n, bool) or not isinstance(self.every_n, int) or self.every_n < 1:
            raise ConfigError(
                f"activation checkpointing every_n={self.every_n!r} is not valid; "
                "use an integer >= 1 (checkpoint blocks 0, n, 2n, ...)."
            )
        if not isinstance(self.preserve_rng_state, bool):
            raise ConfigError(
                f"activation checkpointing preserve_rng_state={self.preserve_rng_state!r} "
                "is not valid; use true or false."
            )
        if self.offload_pin_memory is not None and not isinstance(self.offload_pin_memory, bool):
            raise ConfigError(
                f"activation checkpointing offload_pin_memory={self.offload_pin_memory!r} "
                "is not valid; use true, false, or null/'auto' (pin when CUDA is available)."
            )
        self.target_patterns()  # validates targets

    @property
    def enabled(self) -> bool:
        """False for ``mode="off"``."""
        return self.mode != "off"

    def target_patterns(self) -> tuple[str, ...] | None:
        """The ``targets`` as a tuple of patterns, or ``None`` for ``"auto"``.

        Raises:
            ConfigError: ``targets`` is empty, not a string/list of strings, or mixes ``"auto"``
                with patterns.
        """
        raw = self.targets
        if isinstance(raw, str):
            items = [part.strip() for part in raw.split(",")]
        elif isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
            items = [part.strip() for p in raw for part in p.split(",")]
        else:
            raise ConfigError(
                f"activation checkpointing targets={raw!r} is not valid; use 'auto', a class "
                "name, a glob on module paths, or a list of those."
            )
        items = [p for p in items if p]
        if not items:
            raise ConfigError(
                f"activation checkpointing targets={raw!r} is empty; use 'auto' or name the "
                "block class (e.g. 'GPT2Block') or a path glob (e.g. 'transformer.h.*')."
            )
        if "auto" in items:
            if len(items) > 1:
                raise ConfigError(
                    f"activation checkpointing targets={raw!r} mixes 'auto' with patterns; "
                    "use either 'auto' alone or only patterns."
                )
            return None
        return tuple(items)

    @classmethod
    def from_value(cls, value: bool | str | dict[str, Any] | ActivationCheckpointing | None) -> ActivationCheckpointing:
        """Convert a user flag into an :class:`ActivationCheckpointing`.

        Args:
            value: ``True`` -> ``mode="full"``; ``False``/``None`` -> ``mode="off"``; a mode name
                such as ``"selective"`` -> that mode; a dict -> its keys are field names (``mode``
                defaults to ``"full"``; ``offload_pin_memory: "auto"`` means ``None``); an
                :class:`ActivationCheckpointing` is returned as is.

        Returns:
            The config.

        Raises:
            ConfigError: an unknown dict key or mode, or a value of another type (the message
                names the key or value and lists the valid ones).

        Example:
            >>> ActivationCheckpointing.from_value("selective").mode
            'selective'
            >>> ActivationCheckpointing.from_value(None).enabled
            False
        """
        if isinstance(value, cls):
            return value
        if value is None or value is False:
            return cls(mode="off")
        if value is True:
            return cls(mode="full")
        if isinstance(value, str):
            name = value.strip().lower()
            if name not in MODE_NAMES:
                raise ConfigError(
                    f"activation checkpointing mode {value!r} is not valid; "
                    f"use one of {', '.join(repr(m) for m in MODE_NAMES)}, or true/false."
                )
            return cls(mode=name)  # type: ignore[arg-type]
        if isinstance(value, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            for key in value:
                if key not in valid:
                    raise ConfigError(
                        f"activation checkpointing has no option {key!r}; valid options are {', '.join(valid)}."
                    )
            kwargs = dict(value)
            if isinstance(kwargs.get("offload_pin_memory"), str):
                if kwargs["offload_pin_memory"].strip().lower() != "auto":
                    raise ConfigError(
                        "activation checkpointing offload_pin_memory="
                        f"{kwargs['offload_pin_memory']!r} is not valid; use true, false or 'auto'."
                    )
                kwargs["offload_pin_memory"] = None
            if isinstance(kwargs.get("mode"), str):
                kwargs["mode"] = kwargs["mode"].strip().lower()
            return cls(**kwargs)
        raise ConfigError(
            f"activation checkpointing value {value!r} of type {type(value).__name__} is not "
            "valid; use true/false, a mode name, a dict of options or an ActivationCheckpointing."
        )
