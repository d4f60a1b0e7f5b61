"""Readers for foreign checkpoints: Lightning, Hugging Face, torch, safetensors, DCP.

:func:`read_foreign` turns a checkpoint written by another tool into plain nested state (dicts,
lists, tuples, tensors, numbers, strings), so it can be inspected, converted or restored.
:func:`detect_format` says which reader a path gets; :func:`list_foreign_checkpoints` lists the
checkpoints in a folder in natural order.

No pickle code runs on the default path. Pickle-based files are loaded with
``torch.load(weights_only=True)``, memory-mapped, plus a short list of data-only types that real
checkpoints need (``_pickle.DATA_ONLY_GLOBALS``: the numpy uint32 array in HF's RNG state, paths
and ``argparse.Namespace`` in Lightning hyper-parameters). A file needing anything else raises
:class:`~ckpt_plugins.errors.UnsafeCheckpointError` naming the file and the global; pass
``allow_unsafe_pickle=True`` only for files you trust (or allow-list a data-only class with
``torch.serialization.add_safe_globals``).

What :func:`read_foreign` returns, per format:

- ``"lightning"`` (a ``.ckpt`` file): the checkpoint dict exactly as Lightning saved it:
  ``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``epoch``, ``global_step``,
  ``loops``, ``callbacks``, ``hyper_parameters``, ``pytorch-lightning_version``, ...
- ``"hf"`` (a ``checkpoint-N`` folder from ``transformers.Trainer`` or a ``save_pretrained``
  folder): ``{"model": {name: tensor}, "adapter": {name: tensor}, "optimizer": ...,
  "scheduler": ..., "scaler": ..., "rng_state": ... or {rank: ...}, "trainer_state": <parsed
  trainer_state.json>}`` with only the parts present. Sharded weights are merged into one dict;
  PEFT weights go under ``"adapter"``. ``training_args.bin`` (a pickled ``TrainingArguments``)
  and ``config.json`` are not read.
- ``"torch"`` (a ``.pt``/``.pth``/``.bin`` file): whatever object ``torch.load`` returns,
  usually a dict.
- ``"safetensors"`` (a ``.safetensors`` file): a flat ``{name: tensor}`` dict and nothing else;
  the header's string metadata comes from :func:`read_safetensors_metadata`.
- ``"dcp"`` (a ``torch.distributed.checkpoint`` folder, recognised by its ``.metadata`` file):
  the nested state DCP was given, tensors assembled from their chunks into full plain tensors
  (dict keys come back as strings, as DCP stores them). The ``.metadata`` pickle is read by an
  unpickler that knows only DCP's metadata classes, ``torch.Size`` and torch dtypes
  (:mod:`~ckpt_plugins.formats.dcp_metadata`); anything else raises
  :class:`~ckpt_plugins.errors.UnsafeCheckpointError` before it runs.

``include=`` selects leaves by key path: dict keys and list indices joined with ``"."``
(``"state_dict.layer.0.weight"``, ``"model.transformer.wte.weight"``,
``"optimizer.state.0.exp_avg"``). Only selected leaves are returned; safetensors files read only
the selected tensors, and pickles are memory-mapped so unselected tensors are never read.

Example:
    >>> from ckpt_plugins.formats import read_foreign, describe
    >>> state = read_foreign("out/checkpoint-500", include=lambda k: k.startswith("model."))
    >>> for path, shape, dtype, nbytes in describe(state):
    ...     print(path, shape, dtype, nbytes)
"""

from __future__ import annotations

from ckpt_plugins.formats._dispatch import (
    SUPPORTED_FORMATS,
    detect_format,
    list_foreign_checkpoints,
    read_foreign,
)
from ckpt_plugins.formats.inspect import describe
from ckpt_plugins.formats.safetensors_file import read_safetensors_metadata

__all__ = [
    "SUPPORTED_FORMATS",
    "describe",
    "detect_format",
    "list_foreign_checkpoints",
    "read_foreign",
    "read_safetensors_metadata",
]
