"""The caller's side of a save: check the arguments, flatten the state, collect and stage tensors.

Everything here runs inside ``save()`` on the training thread, before the job is handed to the
writer (:mod:`.save_job`): what can be refused is refused here, with the training loop still in
the call, and the tensors a job will write are copied out of the live state here (safe mode).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckpt_plugins.errors import ConfigError, UnsupportedStateError
from ckpt_plugins.files.extra_files import collect_tensors
from ckpt_plugins.files.manifest import _SAFE_NAME, MANIFEST_NAME
from ckpt_plugins.layout.commit import check_folder_name
from ckpt_plugins.options.checks import check_bool, check_step
from ckpt_plugins.persist.stager import HostStager
from ckpt_plugins.sharded.save import shard_tensors
from ckpt_plugins.tree.codec import flatten_state

__all__ = ["check_save_arguments", "clean_metrics", "collect", "flatten_parts", "stage_now"]

log = logging.getLogger(__name__)


def check_save_arguments(
    step: Any,
    metrics: Mapping[str, Any] | None,
    extra_files: Mapping[str, Any] | None,
    name: str | None,
    wait: Any = False,
) -> dict[str, float]:
    """Refuse a bad ``step``, metric, extra-file name, checkpoint name or ``wait``; return the metrics
    as floats."""
    check_step("step", step)
    check_bool("wait", wait)
    cleaned = clean_metrics(metrics)
    for file_name in extra_files or {}:
        if (
            not isinstance(file_name, str)
            or not _SAFE_NAME.match(file_name)
            or ".." in file_name
            or file_name == MANIFEST_NAME
            or (file_name.endswith(".safetensors") and file_name.startswith(("state", "rank_", "shard_")))
        ):
            raise ConfigError(
                f"extra_files name {file_name!r} is not a plain file name, or is reserved "
                "(manifest.json, state*.safetensors, rank_*.safetensors, shard_*.safetensors)",
                option="extra_files",
                value=file_name,
            )
    if name is not None:
        check_folder_name(name)
    return cleaned


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as ``{name: float}`` (one-element tensors and numpy scalars included)."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigError(
                    f"metric {name!r} is a tensor with {value.numel()} elements; pass a scalar",
                    option="metrics",
                    value=value,
                )
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy scalars and similar
            except (TypeError, ValueError):
                raise ConfigError(
                    f"metric {name!r} must be a number, got {value!r}", option="metrics", value=value
                ) from None
        out[str(name)] = float(value)
        if math.isnan(out[str(name)]):
            log.debug("metric %r is NaN at this save; it ranks worst", name)
    return out


def flatten_parts(state: Any, rank_state: Any, *, rank: int, world_size: int) -> tuple[Any, Any, str | None]:
    """Flatten the shared state and this rank's ``rank_state``.

    Rank 0 keeps the whole state; the other ranks walk it too but keep only its DTensors (the
    chunks of them they write, :mod:`ckpt_plugins.sharded.save`): plain tensors are replicated
    and rank 0 writes them.

    Returns ``(flat, rank_flat, error)``: in a distributed run an unstorable state is not raised
    here but returned as ``error``, so that every rank hears of it in the agreement (a rank that
    raised alone would leave the others waiting in the collective).
    """
    try:
        flat = flatten_state(state, plain_tensors=rank == 0)
        rank_flat = flatten_state(rank_state) if rank_state is not None else None
        if rank_flat is not None and rank_flat.shards:
            raise UnsupportedStateError(
                f"rank_state holds DTensors ({next(iter(rank_flat.shards))!r}, ...); sharded tensors "
                "belong in the state, which every rank saves its shards of"
            )
    except UnsupportedStateError as exc:
        if world_size == 1:
            raise
        return None, None, str(exc)
    return flat, rank_flat, None


def collect(
    flat: Any, rank_flat: Any, extra_files: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor a save writes, keyed ``state/...``, ``shard/...``, ``rank/...`` or by extra file; and the
    extra files' specs (what the job does with each)."""
    tensors: dict[str, torch.Tensor] = {}
    if flat is not None:
        tensors.update({f"state/{k}": v for k, v in flat.tensors.items()})
        tensors.update({f"shard/{k}": v for k, v in shard_tensors(flat.shards).items()})
    if rank_flat is not None:
        tensors.update({f"rank/{k}": v for k, v in rank_flat.tensors.items()})
    extra_tensors, extra_specs = collect_tensors(extra_files or {})
    tensors.update(extra_tensors)
    return tensors, extra_specs


def stage_now(
    stager: HostStager,
    slot: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    snapshot: str,
    async_save: bool,
    heads: Callable[[], Mapping[str, bytes]] | None = None,
) -> Any:
    """Copy ``tensors`` into ``slot``'s buffers now, when the job must not read the live ones: safe
    mode with an async save, or CUDA tensors. None otherwise (the job reads them, or stages them
    itself in overlap mode). ``heads()``: the files to checksum during the copy
    (:meth:`.HostStager.stage`), asked for only when there is a copy. On failure the slot is released."""
    if snapshot != "safe" or not (async_save or any(t.is_cuda for t in tensors.values())):
        return None
    try:
        staged = stager.stage(slot, tensors, heads() if heads is not None else None)
        staged.wait()
    except BaseException:
        stager.release(slot)
        raise
    return staged
