"""The Trainer's own checkpoint files, built for the core's atomic commit.

``Trainer.train(resume_from_checkpoint=...)`` reads a ``checkpoint-N`` folder itself:

============================  =====================================  ==========================
file                          read by                                written here from
============================  =====================================  ==========================
``model.safetensors``         ``_load_from_checkpoint``              the model's state dict,
                                                                     as ``save_pretrained``
                                                                     would write it
``adapter_model.safetensors``  ``_load_from_checkpoint`` (PEFT:      the adapter's weights
``adapter_config.json``        ``model.load_adapter``)               (``get_peft_model_state_dict``)
``optimizer.pt``              ``_load_optimizer_and_scheduler``      ``optimizer.state_dict()``
``scheduler.pt``              (``torch.load(weights_only=True)``)    ``lr_scheduler.state_dict()``
``scaler.pt``                 ``_load_scaler``                       the grad scaler, when used
``rng_state[_<rank>].pth``    ``_load_rng_state``                    every rank's RNG state
``trainer_state.json``        ``TrainerState.load_from_json``        the ``TrainerState``
``training_args.bin``         nobody (the Trainer writes it for      ``torch.save`` of the
                              the record; never read on resume)      ``TrainingArguments``
``config.json``, tokenizer    ``from_pretrained`` (not resume)       the model config, the
                                                                     ``processing_class``
============================  =====================================  ==========================

:func:`native_files` returns them as the core's ``extra_files`` (``{name: bytes | writer}``): the
core writes them into the hidden temporary folder on its background writer, checksums them in the
manifest, and renames the folder to ``checkpoint-N`` only when all of them are complete. Small
files (RNG, scheduler, JSON) are serialized right away on the training thread; the tensors of the
weights and of the optimizer go in as :class:`~ckpt_plugins.files.extra_files.TensorFile` and
:class:`~ckpt_plugins.files.extra_files.StagedFile`, which the core stages like any state (reused host
buffers, ``snapshot="overlap"``) and serializes on the writer.

``training_args.bin`` is a pickle of ``TrainingArguments``, written because the Trainer writes it
and tools expect it; nothing here reads it (the core's HF reader skips it: loading it would need
full pickle).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from ckpt_plugins.files.extra_files import StagedFile, TensorFile
from ckpt_plugins.hf.rng import rng_file_name, serialize_rng_state

__all__ = ["is_peft_model", "native_files", "native_files_warmup", "tokenizer_files", "trainer_state_json"]

log = logging.getLogger(__name__)

FileContent = bytes | Callable[[BinaryIO], None] | TensorFile | StagedFile


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (checked without importing peft when it is not installed)."""
    if "peft" not in sys.modules:  # a PEFT model cannot exist before peft is imported
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def native_files(
    *,
    model: nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    trainer_state: Any,
    rng_states: list[dict[str, Any]],
    world_size: int,
    training_args: Any = None,
    model_only: bool = False,
    extra: Mapping[str, bytes] | None = None,
    sharded: bool = False,
) -> dict[str, FileContent]:
    """The files of one Trainer checkpoint, as ``extra_files`` for ``CheckpointManager.save``.

    Args:
        model: the unwrapped model (``Trainer.model``): a ``PreTrainedModel``, a PEFT model, or any
            ``nn.Module``.
        optimizer: the Trainer's optimizer (``None``: no ``optimizer.pt``/``scheduler.pt``).
        lr_scheduler: the Trainer's scheduler.
        trainer_state: the ``TrainerState`` to write as ``trainer_state.json``.
        rng_states: every rank's RNG state, indexed by rank.
        world_size: number of ranks (names the RNG files as the Trainer expects).
        training_args: the ``TrainingArguments``, written as ``training_args.bin`` (None: not written).
        model_only: ``TrainingArguments.save_only_model``: no optimizer, scheduler or RNG files
            (such a checkpoint is for inference; the Trainer cannot resume training from it).
        extra: more small files, already serialized (the tokenizer's, for example).
        sharded: the model and optimizer are sharded (FSDP2) and saved by every rank in the
            manifest's sharded state (:mod:`.fsdp`): no ``model.safetensors`` or ``optimizer.pt``.

    Returns:
        ``{file name: bytes | TensorFile | StagedFile}``; the live tensors are referenced, not
        copied (the core stages them).
    """
    files: dict[str, FileContent] = {}
    if sharded:
        files.update(_config_files(model))
    elif is_peft_model(model):
        files.update(_peft_files(model))
    else:
        files.update(_model_files(model))
    if model_only:
        optimizer, rng_states = None, []
    if optimizer is not None:
        if not sharded:
            files["optimizer.pt"] = StagedFile(optimizer.state_dict(), _torch_save)
        if lr_scheduler is not None:
            files["scheduler.pt"] = _torch_bytes(lr_scheduler.state_dict())
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            files["scaler.pt"] = _torch_bytes(scaler.state_dict())
    for rank, state in enumerate(rng_states):
        files[rng_file_name(rank, world_size)] = serialize_rng_state(state)
    files["trainer_state.json"] = trainer_state_json(trainer_state)
    if training_args is not None:
        files["training_args.bin"] = _torch_bytes(training_args)  # as Trainer._save: torch.save(self.args)
    files.update(extra or {})
    return files


def native_files_warmup(model: nn.Module) -> None:
    """Run the one-time set-up of building the weights file (transformers builds and caches its
    weight-conversion tables on first use), so the first save does not pay for it."""
    if not is_peft_model(model):
        _model_state_dict(model)


def trainer_state_json(trainer_state: Any) -> bytes:
    """``trainer_state.json`` exactly as ``TrainerState.save_to_json`` writes it."""
    return (json.dumps(dataclasses.asdict(trainer_state), indent=2, sort_keys=True) + "\n").encode()


def tokenizer_files(processing_class: Any) -> dict[str, bytes]:
    """The files ``processing_class.save_pretrained`` writes, as bytes (written once, then reused).

    Returns:
        ``{}`` when there is no processing class or it cannot be saved (logged).
    """
    if processing_class is None or not hasattr(processing_class, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory(prefix="ckpt_plugins_tok_") as scratch:
        try:
            processing_class.save_pretrained(scratch)
        except Exception as exc:
            log.warning(
                "the processing_class (%s) could not be saved into checkpoints: %s",
                type(processing_class).__name__,
                exc,
            )
            return {}
        out = {}
        for name in sorted(os.listdir(scratch)):
            path = os.path.join(scratch, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out


# --- weights -------------------------------------------------------------------------------------
def _model_files(model: nn.Module) -> dict[str, FileContent]:
    return {"model.safetensors": _tensor_file(_model_state_dict(model)), **_config_files(model)}


def _config_files(model: nn.Module) -> dict[str, FileContent]:
    """``config.json`` (and ``generation_config.json``), as ``save_pretrained`` writes them."""
    files: dict[str, FileContent] = {}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).split(".")[1]
        files["config.json"] = config.to_json_string(use_diff=True).encode()
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        files["generation_config.json"] = generation.to_json_string(use_diff=True).encode()
    return files


def _model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` would write: ignored keys and tied duplicates removed."""
    state_dict = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state_dict.pop(key, None)
    try:
        from transformers.modeling_utils import PreTrainedModel, remove_tied_weights_from_state_dict
    except ImportError:  # other transformers versions: drop aliases by storage
        return _drop_aliases(state_dict)
    if not isinstance(model, PreTrainedModel):
        return _drop_aliases(state_dict)
    state_dict = remove_tied_weights_from_state_dict(state_dict, model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state_dict
    return revert_weight_conversion(model, state_dict)


def _drop_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state_dict.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in seen:
            log.debug("not writing %s: it shares memory with a tensor already written (tied)", name)
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _peft_files(model: Any) -> dict[str, FileContent]:
    """The adapter files of a PEFT model (typed ``Any``: peft ships no type information)."""
    from peft import get_peft_model_state_dict

    adapter = model.active_adapters[0] if hasattr(model, "active_adapters") else "default"
    if len(getattr(model, "active_adapters", [adapter])) > 1:
        log.warning(
            "only the first active adapter (%r) is written into checkpoints, as the Trainer resumes only that one",
            adapter,
        )
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    config = copy.deepcopy(model.peft_config[adapter])
    if config.base_model_name_or_path is None:
        base = model.base_model.model if not config.is_prompt_learning else model.base_model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    doc = {k: list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {
        "adapter_model.safetensors": _tensor_file(weights),
        "adapter_config.json": json.dumps(doc, indent=2, sort_keys=True).encode(),
    }


# --- serialization -------------------------------------------------------------------------------
def _tensor_file(tensors: Mapping[str, torch.Tensor]) -> TensorFile:
    """Weights as ``save_pretrained`` writes them: safetensors with ``{"format": "pt"}``."""
    return TensorFile({k: v.detach() for k, v in tensors.items()}, metadata={"format": "pt"})


def _torch_save(out: BinaryIO, obj: Any) -> None:
    """Writer of ``optimizer.pt``: ``torch.save`` of the staged state dict (runs on the writer).

    Where torch lets this thread alone change its serialization settings: without the zip's
    CRC-32 of each record, a second checksum pass over the optimizer state (about 18 ms of CPU
    per 100 MB, most of ``torch.save``'s time) that ``torch.load`` never checks (the manifest's
    xxh3 of the whole file, computed on the same write, is what ``verify`` and a restore check);
    and with records aligned to 4 KiB in the file, so that the staged storage (one page-aligned
    block) goes to disk with ``O_DIRECT`` from where it is, in one write, without a copy."""
    with _writer_settings():
        torch.save(obj, out)


@functools.cache
def _crc_switch_is_per_thread() -> bool:
    """Whether ``torch.utils.serialization.config.patch`` is seen by the patching thread only
    (torch keeps its overrides in context variables): only then may the writer turn the CRC off
    while the training thread may be calling ``torch.save`` itself."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return False
    patched, checked, seen = threading.Event(), threading.Event(), []

    def probe() -> None:
        with config.patch({"save.compute_crc32": False}):  # type: ignore[attr-defined]
            patched.set()
            checked.wait(5)

    thread = threading.Thread(target=probe, name="ckpt-crc-probe", daemon=True)
    try:
        thread.start()
        if patched.wait(5):
            seen.append(config.save.compute_crc32)
    except Exception:  # an unexpected config module: keep torch's default
        return False
    finally:
        checked.set()
        thread.join(5)
    return seen == [True] and config.save.compute_crc32 is True


@contextlib.contextmanager
def _writer_settings() -> Iterator[None]:
    if not _crc_switch_is_per_thread():
        yield
        return
    from torch.utils.serialization import config

    settings: dict[str, Any] = {"save.compute_crc32": False}
    if hasattr(config.save, "storage_alignment"):
        settings["save.storage_alignment"] = 4096
    with config.patch(settings):  # type: ignore[attr-defined]
        yield


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
