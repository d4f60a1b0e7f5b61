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
``config.json``, tokenizer    ``from_pretrained`` (not resume)       the model config, the
                                                                     ``processing_class``
============================  =====================================  ==========================

:func:`native_files` returns them as the core's ``extra_files`` (``{name: bytes | writer}``): the
core writes them into the hidden temporary folder on its background writer, checksums them in the
manifest, and renames the folder to ``checkpoint-N`` only when all of them are complete. Small
files are serialized right away on the training thread; tensors are written by the writer from a
copy taken here, so training can change the live ones meanwhile.

``training_args.bin`` (a pickle of ``TrainingArguments``; the Trainer never reads it back) is not
written.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import safetensors.torch
import torch
from torch import nn

from ckpt_plugins.hf.rng import rng_file_name, serialize_rng_state

__all__ = ["native_files", "is_peft_model", "tokenizer_files"]

log = logging.getLogger(__name__)

FileContent = bytes | Callable[[BinaryIO], None]


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (checked without importing peft when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def native_files(*, model: nn.Module, optimizer: Any, lr_scheduler: Any, trainer_state: Any,
                 rng_states: list[dict[str, Any]], world_size: int, copy_tensors: bool,
                 extra: Mapping[str, bytes] | None = None) -> dict[str, FileContent]:
    """The files of one Trainer checkpoint, as ``extra_files`` for ``CheckpointManager.save``.

    Args:
        model: the unwrapped model (``Trainer.model``): a ``PreTrainedModel``, a PEFT model, or any
            ``nn.Module``.
        optimizer: the Trainer's optimizer (``None``: no ``optimizer.pt``/``scheduler.pt``).
        lr_scheduler: the Trainer's scheduler.
        trainer_state: the ``TrainerState`` to write as ``trainer_state.json``.
        rng_states: every rank's RNG state, indexed by rank.
        world_size: number of ranks (names the RNG files as the Trainer expects).
        copy_tensors: copy tensors now (asynchronous saves: the writer runs later, while training
            changes the live tensors). False when the save is written before ``save`` returns.
        extra: more small files, already serialized (the tokenizer's, for example).

    Returns:
        ``{file name: bytes or fn(binary file)}``.
    """
    files: dict[str, FileContent] = {}
    if is_peft_model(model):
        files.update(_peft_files(model, copy_tensors))
    else:
        files.update(_model_files(model, copy_tensors))
    if optimizer is not None:
        files["optimizer.pt"] = _torch_file(optimizer.state_dict(), copy_tensors)
        if lr_scheduler is not None:
            files["scheduler.pt"] = _torch_bytes(lr_scheduler.state_dict())
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            files["scaler.pt"] = _torch_bytes(scaler.state_dict())
    for rank, state in enumerate(rng_states):
        files[rng_file_name(rank, world_size)] = serialize_rng_state(state)
    files["trainer_state.json"] = trainer_state_json(trainer_state)
    files.update(extra or {})
    return files


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
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot save must not stop training
            log.warning("the processing_class (%s) could not be saved into checkpoints: %s",
                        type(processing_class).__name__, exc)
            return {}
        out = {}
        for name in sorted(os.listdir(scratch)):
            path = os.path.join(scratch, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out


# --- weights -------------------------------------------------------------------------------------
def _model_files(model: nn.Module, copy_tensors: bool) -> dict[str, FileContent]:
    files: dict[str, FileContent] = {"model.safetensors": _safetensors_file(_model_state_dict(model), copy_tensors)}
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
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if key in seen:
            log.debug("not writing %s: it shares memory with a tensor already written (tied)", name)
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _peft_files(model: nn.Module, copy_tensors: bool) -> dict[str, FileContent]:
    from peft import get_peft_model_state_dict

    adapter = model.active_adapters[0] if hasattr(model, "active_adapters") else "default"
    if len(getattr(model, "active_adapters", [adapter])) > 1:
        log.warning("only the first active adapter (%r) is written into checkpoints, as the Trainer "
                    "resumes only that one", adapter)
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    config = copy.deepcopy(model.peft_config[adapter])
    if config.base_model_name_or_path is None:
        base = model.base_model.model if not config.is_prompt_learning else model.base_model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    doc = {k: list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {"adapter_model.safetensors": _safetensors_file(weights, copy_tensors),
            "adapter_config.json": json.dumps(doc, indent=2, sort_keys=True).encode()}


# --- serialization -------------------------------------------------------------------------------
def _safetensors_file(tensors: Mapping[str, torch.Tensor], copy_tensors: bool) -> FileContent:
    tensors = {k: v.detach() for k, v in tensors.items()}
    if copy_tensors:
        tensors = _detached_copy(tensors)
    else:
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}

    def write(out: BinaryIO) -> None:
        # TODO(core request HF-1): the core's streamed writer avoids this in-memory copy.
        out.write(safetensors.torch.save(tensors, metadata={"format": "pt"}))
    return write


def _torch_file(obj: Any, copy_tensors: bool) -> FileContent:
    if copy_tensors:
        obj = _detached_copy(obj)

    def write(out: BinaryIO) -> None:
        torch.save(obj, out)
    return write


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _detached_copy(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are CPU clones (containers rebuilt, other values shared).

    TODO(core request HF-1): remove. The core's stager should take this copy into reused host
    buffers (pinned on CUDA; overlapping the next forward/backward with ``snapshot="overlap"``).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True).contiguous()
    if isinstance(obj, Mapping):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detached_copy(v) for v in obj)
    return copy.deepcopy(obj)
