"""``ckpt-plugins convert SRC DST --to FORMAT``: write a checkpoint as another tool's file.

- ``--to lightning``: a plain ``.ckpt`` that ``LightningModule.load_from_checkpoint`` and
  ``Trainer.fit(ckpt_path=...)`` read (from a checkpoint of our Lightning integration, or a
  ``.ckpt``); see :func:`ckpt_plugins.lightning.convert.to_lightning_checkpoint`.
- ``--to safetensors``: every tensor of any checkpoint, flat, under its key path
  (``model.transformer.wte.weight``); numbers, strings and numpy arrays are left out. A sharded
  checkpoint (FSDP2, tensor parallel) is consolidated tensor by tensor, streamed: memory stays
  bounded by the largest tensor (:mod:`ckpt_plugins.sharded.consolidate`).
- ``--to hf``: a folder with ``model.safetensors``, the tensors under the state's ``model`` key
  (``model.state_dict()`` as saved), names as ``from_pretrained`` expects them.
- ``--to ours``: any checkpoint (a ``torch.distributed.checkpoint`` folder, a ``.pt``, ...) as one
  of our checkpoint folders (safetensors + manifest, no pickle), committed at DST.
- ``--to dcp``: any checkpoint as a ``torch.distributed.checkpoint`` folder, written by DCP's own
  ``dcp.save`` from full tensors. DCP's format is pickles (``.metadata`` and every item): that is
  the user's explicit choice here (:mod:`ckpt_plugins.formats.dcp_write`).

SRC is one checkpoint or a run folder (its newest numbered checkpoint, or ``--step``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ckpt_plugins.cli.storage import open_path, options
from ckpt_plugins.errors import CheckpointNotFoundError, ConfigError
from ckpt_plugins.formats import detect_format
from ckpt_plugins.restore.read import is_our_checkpoint, restore_path
from ckpt_plugins.tree.walk import iter_leaves

from . import catalog
from .render import progress

__all__ = ["add_parser", "resolve_source", "run"]

TARGETS = ("lightning", "safetensors", "hf", "ours", "dcp")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint as another tool's file (.ckpt, .safetensors, a DCP folder) or as ours",
        description="Convert one checkpoint, or a run folder's newest (or --step), to another format.",
    )
    p.add_argument("src", help="a checkpoint (folder or file), or a run folder (its newest checkpoint)")
    p.add_argument(
        "dst",
        help="the file or folder to write, e.g. model.ckpt, weights.safetensors, a folder for --to ours "
        "or --to dcp (replaced atomically)",
    )
    p.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="lightning: a .ckpt for Lightning (from a Lightning checkpoint); safetensors: every "
        "tensor of any checkpoint, flat by key path (sharded checkpoints streamed); hf: a folder with "
        "model.safetensors, the tensors under the state's 'model' key; ours: a checkpoint folder of ours (no pickle) "
        "from any checkpoint, DCP folders included; dcp: a torch.distributed.checkpoint folder "
        "written by dcp.save from full tensors (DCP's format is pickles: .metadata and every item)",
    )
    p.add_argument("--step", type=int, metavar="N", help="with a run folder: convert step N (default: the newest)")
    p.add_argument(
        "--as-step",
        type=int,
        metavar="N",
        help="--to ours: the step recorded in the manifest (default: the state's top-level int "
        "'step' or 'global_step', else 0)",
    )
    p.set_defaults(func=run)


def resolve_source(src: str, step: int | None) -> catalog.Entry | str:
    """The checkpoint ``src`` names: itself, or a run folder's newest (or ``step``).

    Raises:
        CheckpointNotFoundError: the run folder has no numbered checkpoint, or none at ``step``
            (the message lists the steps there).
        ConfigError: ``step`` was given with a single checkpoint.
    """
    storage, root = open_path(src)
    numbered = [e for e in catalog.run_folder_entries(src) if e.numbered and e.step is not None]
    if not numbered and (is_our_checkpoint(storage, root) or detect_format(src) not in (None, "ckpt_plugins")):
        if step is not None:
            raise ConfigError(f"--step applies to a run folder; {src} is one checkpoint (drop --step)")
        return src
    steps = sorted({e.step for e in numbered if e.step is not None})
    if not numbered:
        raise CheckpointNotFoundError(
            f"{src} holds no numbered checkpoint to convert (our step_N/checkpoint-N "
            "folders, .ckpt files, Trainer checkpoint-N folders); pass one checkpoint"
        )
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise CheckpointNotFoundError(
            f"{src} has no checkpoint at step {step}; steps there: {', '.join(map(str, steps))}"
        )
    return [e for e in numbered if e.step == chosen][-1]


def _full_state(path: str) -> Any:
    """The checkpoint's whole state as plain objects, full tensors (a foreign one: no pickle code)."""
    state, _ = restore_path(
        path,
        target=None,
        selector=None,
        rename=None,
        strict=True,
        map_location="cpu",
        allow_unsafe_pickle=False,
        verify=True,
        storage_options=options(),
    )
    return state


def _write_safetensors(path: str, dst: str, prefix: str = "") -> int:
    from safetensors.torch import save_file

    from ckpt_plugins.sharded.consolidate import consolidate, is_sharded_checkpoint

    if is_sharded_checkpoint(path, options()):
        source = path if "://" in path else os.path.abspath(path)
        return consolidate(
            path, dst, prefix=prefix, metadata={"format": "pt", "source": source}, storage_options=options()
        )
    state = _full_state(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, Any]] = set()
    for key, value in iter_leaves(state):
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous()
            ident = (t.untyped_storage().data_ptr(), t.storage_offset())
            tensors[key] = t.clone() if ident in seen and t.numel() else t  # safetensors refuses shared memory
            seen.add(ident)
    if not tensors:
        where = f" under {prefix[:-1]!r}" if prefix else ""
        raise ConfigError(f"{path} holds no tensors{where}; there is nothing to write to {dst}")
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "source": os.path.abspath(path)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(tensors)


def _write_ours(path: str, dst: str, as_step: int | None) -> int:
    """Commit ``path``'s state as our checkpoint folder ``dst`` (a named checkpoint of its parent)."""
    from ckpt_plugins.manager import CheckpointManager

    if os.path.lexists(dst) and not is_our_checkpoint(*open_path(dst)):
        raise ConfigError(f"{dst} exists and is not a checkpoint of ours; pass a new path (nothing was written)")
    state = _full_state(path)
    if as_step is None:
        found = [state.get(k) for k in ("step", "global_step")] if isinstance(state, dict) else []
        as_step = next((v for v in found if type(v) is int and v >= 0), 0)
    parent, name = os.path.split(os.path.abspath(dst))
    with CheckpointManager(parent) as mgr:
        mgr.save(as_step, state, name=name)
    return as_step


def _write_dcp(path: str, dst: str) -> None:
    from ckpt_plugins.formats.dcp_write import check_destination, write_dcp

    check_destination(dst)  # before reading the source, which may be large
    state = _full_state(path)
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a dict; DCP checkpoints hold a dict")
    write_dcp(state, dst)


def run(args: argparse.Namespace) -> int:
    source = resolve_source(args.src, args.step)
    path = source.path if isinstance(source, catalog.Entry) else source
    if args.to == "lightning" and catalog.kind_of(path) != "lightning":
        what = "a Hugging Face Trainer checkpoint" if catalog.kind_of(path) == "hf" else "not a Lightning checkpoint"
        raise ConfigError(
            f"{path} is {what}; --to lightning converts checkpoints of Lightning runs (our Lightning "
            "callback or plugin, or a .ckpt) only. Write its tensors with --to safetensors instead"
        )
    if args.as_step is not None and args.to != "ours":
        raise ConfigError(
            f"--as-step applies to --to ours only, not --to {args.to}", option="--as-step", value=args.as_step
        )
    if args.as_step is not None and args.as_step < 0:
        raise ConfigError(
            f"--as-step must be a step (an int >= 0), got {args.as_step}", option="--as-step", value=args.as_step
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    with progress(f"converting {os.path.basename(path.rstrip('/'))}", None):
        if args.to == "lightning":
            from ckpt_plugins.lightning.convert import to_lightning_checkpoint  # imports no Lightning

            to_lightning_checkpoint(path, args.dst)
            print(f"wrote {args.dst} from {path}")
        elif args.to == "hf":
            os.makedirs(args.dst, exist_ok=True)
            count = _write_safetensors(path, os.path.join(args.dst, "model.safetensors"), prefix="model.")
            print(f"wrote {os.path.join(args.dst, 'model.safetensors')} ({count} tensors) from {path}")
        elif args.to == "ours":
            step = _write_ours(path, args.dst, args.as_step)
            print(f"wrote {args.dst} (step {step}) from {path}")
        elif args.to == "dcp":
            _write_dcp(path, args.dst)
            print(f"wrote {args.dst} (a torch.distributed.checkpoint folder) from {path}")
        else:
            count = _write_safetensors(path, args.dst)
            print(f"wrote {args.dst} ({count} tensors) from {path}")
    return 0
