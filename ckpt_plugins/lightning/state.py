"""A Lightning checkpoint dict as state the core can store without pickle, and back.

What ``Trainer`` puts in a checkpoint (``trainer._checkpoint_connector.dump_checkpoint``):
``epoch``, ``global_step``, ``pytorch-lightning_version``, ``state_dict``, ``loops`` (progress
counters and, for a ``StatefulDataLoader``, its position), ``callbacks`` (each callback's
``state_dict()`` under its state key), ``optimizer_states``, ``lr_schedulers``, the precision
plugin's and the datamodule's state under their class names, ``hparams_name``,
``hyper_parameters`` / ``datamodule_hyper_parameters``, and whatever ``on_save_checkpoint``
hooks add. Almost all of it is plain data (tensors, numbers, strings, dicts, lists, tuples, int
keys), which the core stores as it is.

The exception is the hyper-parameters: ``save_hyperparameters()`` records the ``__init__``
arguments as given, so they can hold paths, namespaces, dataclasses, enums, configs, functions,
modules. They describe the run and are fed back to ``__init__`` by ``load_from_checkpoint``, so
they are converted rather than refused:

=========================================  =========================================
value                                      stored as
=========================================  =========================================
None, bool, int, float, str, tensors,      itself
numpy arrays and scalars, dtype, device
dict / list / tuple                       the same container, values converted
set, namedtuple                            a list / a dict of its fields
``pathlib.PurePath``                       ``str(path)``
``argparse.Namespace``                     ``dict(vars(ns))``
dataclass instance                         a dict of its fields
``enum.Enum`` member                       its ``value``
OmegaConf container                        ``OmegaConf.to_container(resolve=True)``
anything else (functions, modules, ...)    ``repr(value)``, with a warning naming the key
=========================================  =========================================

Conversions are recorded in the checkpoint's metadata (``hyper_parameters_converted``: key path
-> original type) so a reader can tell a string from a former object. Pass the real objects as
keyword arguments to ``load_from_checkpoint`` to override them.

Everything else is state that is loaded back into a running trainer, where a lossy conversion
would silently break the resume; an object there is refused with
:class:`~ckpt_plugins.errors.UnsupportedStateError`, whose message names the key path and where
in Lightning that key comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckpt_plugins.errors import UnsupportedStateError

__all__ = ["HPARAM_KEYS", "RANK_STATE_KEY", "explain_unsupported", "to_storable"]

log = logging.getLogger(__name__)

HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
"""Top-level keys converted by the table above; every other key must already be plain data."""

RANK_STATE_KEY = "ckpt_plugins_rank_state"
"""Key under which :class:`~ckpt_plugins.lightning.CheckpointIOPlugin` hands this rank's own
state (RNG, data position) to :class:`~ckpt_plugins.lightning.CheckpointCallback` when Lightning
loads a checkpoint. It is never written into the stored state."""

_PLAIN = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    torch.Tensor,
    np.ndarray,
    np.generic,
    torch.dtype,
    torch.device,
    torch.Size,
)

_ORIGINS = {
    "state_dict": "the LightningModule's state_dict()",
    "optimizer_states": "an optimizer's state_dict()",
    "lr_schedulers": "a learning-rate scheduler's state_dict()",
    "callbacks": "a callback's state_dict() or on_save_checkpoint()",
    "loops": "Lightning's loop state (a StatefulDataLoader's state_dict(), for example)",
}


def to_storable(checkpoint: Mapping[str, Any], warned: set[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Convert the hyper-parameters of a Lightning checkpoint dict (see the module docstring).

    Args:
        checkpoint: the dict Lightning built for a save (not modified).
        warned: key paths already warned about (updated); a callback passes one set for the
            whole run so each key is reported once, not at every save.

    Returns:
        ``(state, converted)``: a shallow copy of ``checkpoint`` with plain hyper-parameters, and
        ``{key path: original type name}`` for every value that was converted.
    """
    state = dict(checkpoint)
    converted: dict[str, str] = {}
    warned = set() if warned is None else warned
    for key in HPARAM_KEYS:
        if key in state and state[key] is not None:
            state[key] = _plain(state[key], key, converted, warned)
    return state, converted


def _plain(value: Any, path: str, converted: dict[str, str], warned: set[str]) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{path}.{k}", converted, warned) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)) and not hasattr(value, "_fields"):
        items = [_plain(v, f"{path}.{i}", converted, warned) for i, v in enumerate(value)]
        return items if isinstance(value, (list, set, frozenset)) else tuple(items)
    type_name = f"{type(value).__module__}.{type(value).__qualname__}"
    converted[path] = type_name
    plain = _convert(value)
    if plain is not _UNCONVERTED:
        return _plain(plain, path, converted, warned)
    text = repr(value)
    if path not in warned:
        warned.add(path)
        log.warning(
            "hyper-parameter %r is a %s, which is not plain data; it is stored as the string "
            "%.80r. Pass the object itself to load_from_checkpoint(..., %s=...) when you load "
            "this checkpoint.",
            path,
            type_name,
            text,
            path.rsplit(".", 1)[-1],
        )
    return text


_UNCONVERTED = object()


def _convert(value: Any) -> Any:
    """The plain value for the lossless rows of the module table, else ``_UNCONVERTED``."""
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # namedtuple
        return dict(value._asdict())
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return _UNCONVERTED


def explain_unsupported(exc: UnsupportedStateError) -> UnsupportedStateError:
    """The core's error with where the key comes from in Lightning, and what to do."""
    key_path = getattr(exc, "key_path", None)
    top = key_path.split(".", 1)[0] if key_path else None
    origin = _ORIGINS.get(top) if top else None
    hint = (
        f" In a Lightning checkpoint this key comes from {origin}."
        if origin
        else " In a Lightning checkpoint a top-level key like this one is added by an "
        "on_save_checkpoint() hook (LightningModule, DataModule or callback)."
    )
    return UnsupportedStateError(
        str(exc) + hint + " Store plain values there (tensors, numbers, strings, lists, "
        "dicts), e.g. a dict of the object's fields.",
        key_path=key_path,
    )
