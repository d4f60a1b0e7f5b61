"""One class per activation-checkpointing mode.

A mode answers three questions, each by one method:

* :meth:`CheckpointMode.selects` - which of the blocks it touches (all of them, or every n-th);
* :meth:`CheckpointMode.run` - how a touched block's forward runs;
* :meth:`CheckpointMode.hf_kwargs` - how to say the same thing to a Hugging Face model's own
  ``activation_checkpointing_enable``, or ``None`` when that mechanism cannot express it.

Every call to :func:`torch.utils.checkpoint.checkpoint` passes ``use_reentrant=False``
explicitly: the non-reentrant implementation supports keyword arguments, inputs that do not
require grad (frozen embeddings under LoRA), nested ``torch.autograd.grad`` and DDP without
"mark a variable ready only once" errors. Keyword arguments of the block are bound with
``functools.partial`` (as transformers does), so names such as ``context_fn`` in a block's
signature cannot collide with checkpoint's own.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ckpt_plugins.activation.config import MODE_NAMES, ActivationCheckpointing

Forward = Callable[..., Any]

# Ops whose outputs ``"selective"`` keeps: matmuls and attention kernels. ``aten.linear`` never
# reaches the dispatcher (it decomposes into addmm/mm/bmm), and SDPA dispatches either to one of
# the fused kernels below or, on the math path (e.g. CPU with attention dropout), to bmm + softmax.
_SAVE_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_mm",
    "_int_mm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def _resolve_ops(names: tuple[str, ...]) -> frozenset[Any]:
    ops: list[Any] = []
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.extend(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


SELECTIVE_SAVE_OPS: frozenset = _resolve_ops(_SAVE_OP_NAMES)
"""The aten op overloads whose outputs the ``"selective"`` policy keeps."""


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The per-op policy of ``mode="selective"``: keep matmul/attention outputs, recompute the rest.

    Matmuls and attention dominate a transformer block's FLOPs but produce few of its saved bytes;
    pointwise ops (GELU's tanh chain, dropout, residual adds) and norms are cheap to redo but save
    many large tensors. Passed to :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`.
    """
    if op in SELECTIVE_SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointMode(ABC):
    """How the blocks of a model are checkpointed; one subclass per ``mode`` value."""

    name: ClassVar[str]
    """The ``mode`` string this class implements."""
    recomputes: ClassVar[bool] = True
    """Whether the block's forward runs again during backward (the BatchNorm guard cares)."""

    def __init__(self, config: ActivationCheckpointing) -> None:
        self.config = config

    def selects(self, index: int) -> bool:
        """Whether the ``index``-th target block (in module order) is touched."""
        return True

    @abstractmethod
    def run(self, module: nn.Module, forward: Forward, args: tuple, kwargs: dict) -> Any:
        """Run ``module``'s original ``forward`` with its arguments (called by the wrapper)."""

    def hf_kwargs(self) -> dict[str, Any] | None:
        """Arguments for ``PreTrainedModel.activation_checkpointing_enable``, or ``None``."""
        return None

    def describe(self) -> str:
        """A few words for the report, e.g. ``"checkpoint (recompute in backward)"``."""
        return self.name

    def _checkpoint(self, forward: Forward, args: tuple, kwargs: dict, **extra: Any) -> Any:
        fn = functools.partial(forward, **kwargs) if kwargs else forward
        return torch.utils.checkpoint.checkpoint(
            fn,
            *args,
            use_reentrant=False,
            preserve_rng_state=self.config.preserve_rng_state,
            **extra,
        )

    def _checkpoint_kwargs(self) -> dict[str, Any]:
        return {"use_reentrant": False, "preserve_rng_state": self.config.preserve_rng_state}


class FullCheckpoint(CheckpointMode):
    """``mode="full"``: keep each block's inputs, recompute its whole forward in backward."""

    name = "full"

    def run(self, module: nn.Module, forward: Forward, args: tuple, kwargs: dict) -> Any:
        return self._checkpoint(forward, args, kwargs)

    def hf_kwargs(self) -> dict[str, Any] | None:
        return {"activation_checkpointing_kwargs": self._checkpoint_kwargs(), "every_n_layers": 1}

    def describe(self) -> str:
        return "checkpoint (full recompute)"


class EveryNCheckpoint(FullCheckpoint):
    """``mode="every_n"``: full checkpointing of blocks ``0, n, 2n, ...``; the rest untouched."""

    name = "every_n"

    def selects(self, index: int) -> bool:
        return index % self.config.every_n == 0

    def hf_kwargs(self) -> dict[str, Any] | None:
        return {"activation_checkpointing_kwargs": self._checkpoint_kwargs(), "every_n_layers": self.config.every_n}

    def describe(self) -> str:
        return f"checkpoint (full recompute, every {self.config.every_n} blocks)"


class SelectiveCheckpoint(CheckpointMode):
    """``mode="selective"``: checkpoint with :func:`selective_policy` deciding per op."""

    name = "selective"

    @staticmethod
    def context_fn() -> Any:
        """The ``context_fn`` handed to :func:`torch.utils.checkpoint.checkpoint`."""
        return create_selective_checkpoint_contexts(selective_policy)

    def run(self, module: nn.Module, forward: Forward, args: tuple, kwargs: dict) -> Any:
        return self._checkpoint(forward, args, kwargs, context_fn=self.context_fn)

    def hf_kwargs(self) -> dict[str, Any] | None:
        kwargs = self._checkpoint_kwargs()
        kwargs["context_fn"] = self.context_fn
        return {"activation_checkpointing_kwargs": kwargs, "every_n_layers": 1}

    def describe(self) -> str:
        return "selective checkpoint (save matmul/attention outputs, recompute the rest)"


class OffloadActivations(CheckpointMode):
    """``mode="offload"``: recompute nothing; move the block's saved tensors to host memory.

    Tensors already on the CPU and the block's own parameters (saved by matmuls, and alive anyway)
    stay where they are, so on a CPU-only model this mode changes no memory at all.
    Hugging Face's ``offload=True`` is different (checkpointing plus offloading the checkpoint
    inputs), so this mode always wraps.
    """

    name = "offload"
    recomputes = False

    def pin_memory(self) -> bool:
        pin = self.config.offload_pin_memory
        return torch.cuda.is_available() if pin is None else pin

    def run(self, module: nn.Module, forward: Forward, args: tuple, kwargs: dict) -> Any:
        with _OffloadToHost(self.pin_memory(), _storage_ptrs(module)):
            return forward(*args, **kwargs)

    def describe(self) -> str:
        return f"offload saved tensors to host memory (pin_memory={self.pin_memory()})"


class NoCheckpoint(CheckpointMode):
    """``mode="off"``: touch nothing."""

    name = "off"
    recomputes = False

    def selects(self, index: int) -> bool:
        return False

    def run(self, module: nn.Module, forward: Forward, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **kwargs)


MODES: dict[str, type[CheckpointMode]] = {
    cls.name: cls for cls in (FullCheckpoint, EveryNCheckpoint, SelectiveCheckpoint, OffloadActivations, NoCheckpoint)
}
assert set(MODES) == set(MODE_NAMES), "every mode name needs exactly one CheckpointMode class"


def build_mode(config: ActivationCheckpointing) -> CheckpointMode:
    """The :class:`CheckpointMode` for ``config.mode``."""
    return MODES[config.mode](config)


def _storage_ptrs(module: nn.Module) -> frozenset[int]:
    ptrs = set()
    for tensor in list(module.parameters()) + list(module.buffers()):
        try:
            ptrs.add(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            continue
    return frozenset(ptrs)


class _OffloadToHost(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that park device tensors in (optionally pinned) host memory.

    Like :class:`torch.autograd.graph.save_on_cpu`, but leaves CPU tensors, tensor subclasses and
    the block's parameters/buffers alone instead of copying them.
    """

    def __init__(self, pin_memory: bool, keep: frozenset[int]) -> None:
        def pack(tensor: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
            if (
                tensor.device.type == "cpu"
                or isinstance(tensor, nn.Parameter)
                or type(tensor) is not torch.Tensor
                or tensor.is_sparse
                or tensor.untyped_storage().data_ptr() in keep
            ):
                return None, tensor
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
            host.copy_(tensor, non_blocking=pin_memory)
            return tensor.device, host

        def unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
            device, tensor = packed
            return tensor if device is None else tensor.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)
