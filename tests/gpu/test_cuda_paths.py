"""The CUDA code paths, on a real GPU: staging CUDA tensors into pinned host buffers on a side
stream (safe and overlap snapshots, thread and process writers), the memory tier, restores across
devices, and a real Lightning Trainer and HF Trainer training on the GPU with our callbacks.

Without CUDA the same tests run on the CPU (``DEVICE`` is then the CPU), so ``make test`` checks
their logic everywhere; what only CUDA can show (pinned buffers, side streams, FSDP on a GPU) is
marked ``cuda_only`` and skipped there. ``benchmarks/run_gpu.sh`` runs the file on a GPU machine.
Lightning and transformers are imported inside the tests that use them.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckpt_plugins import CheckpointManager, MemoryTierOptions
from ckpt_plugins.files.extra_files import StagedFile
from ckpt_plugins.persist import stager as stager_module
from ckpt_plugins.persist.stager import ALIGN

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ON_CUDA = DEVICE.type == "cuda"
ACCELERATOR = "gpu" if ON_CUDA else "cpu"
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (pinned buffers, streams, FSDP on a GPU)")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread (the shared fixture in tests/conftest.py), for every test here."""


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _keep_gpu_busy(ms: float = 30.0) -> None:
    """Queue a kernel that spins for about ``ms`` on the current stream (nothing on the CPU), so
    that what is queued after it has surely not run when the host goes on."""
    if ON_CUDA:
        torch.cuda._sleep(int(ms * 2e6))  # cycles; ~2 GHz


# --- a small CUDA training state ---------------------------------------------------------------
def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(DEVICE)


def _batch() -> torch.Tensor:
    return torch.randn(16, 32, device=DEVICE)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, before_step=None) -> None:
    opt.zero_grad()
    model(_batch()).pow(2).mean().backward()
    if before_step is not None:
        before_step()
    opt.step()


def _trained(steps: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and AdamW on DEVICE after ``steps`` real steps (the optimizer has its state)."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _train_step(model, opt)
    return model, opt


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Another model and an AdamW without state, on DEVICE: the restore targets."""
    torch.manual_seed(1)
    model = _net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _cloned(tree: Any) -> Any:
    """A deep copy of a state (tensors cloned where they are, stream-ordered on CUDA)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def assert_same(expected: Any, got: Any, path: str = "", devices: bool = True) -> None:
    """Equal structure, values bit for bit, and (``devices``) each tensor on the expected device."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got).__name__}, not a tensor"
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        if devices:
            assert got.device == expected.device, f"{path}: on {got.device}, expected {expected.device}"
        assert torch.equal(got.to(expected.device), expected), f"{path}: values differ"
    elif isinstance(expected, Mapping):
        assert isinstance(got, Mapping) and set(got) == set(expected), f"{path}: keys {set(got)} != {set(expected)}"
        for key in expected:
            assert_same(expected[key], got[key], f"{path}.{key}", devices)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{path}[{i}]", devices)
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _manager(path: Path, **options: Any) -> CheckpointManager:
    """A manager; with ``writer="process"`` once its writer process is ready (until then the
    writer thread writes, and the test would not test the process)."""
    mgr = CheckpointManager(path, **options)
    if options.get("writer") == "process":
        mgr._persister.process_writer.wait_ready()
    return mgr


WRITERS = [
    pytest.param({}, id="sync"),
    pytest.param({"async_save": True}, id="async-thread"),
    pytest.param({"async_save": True, "writer": "process"}, id="async-process"),
]


# --- 1. round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", WRITERS)
def test_a_device_training_state_round_trips_bit_exact_into_a_fresh_model_and_optimizer(tmp_path, options):
    model, opt = _trained()
    expected = _cloned(_state(model, opt))
    assert all(t.device.type == DEVICE.type for t in _tensors(expected["model"]))
    with _manager(tmp_path, **options) as mgr:
        handle = mgr.save(1, {**_state(model, opt), "step": 1})
        assert handle is not None
        handle.wait()
        if options.get("writer") == "process":
            assert mgr._persister.process_writer._sent, "the writer process wrote nothing"
        assert mgr.verify(1) == []
        target_model, target_opt = _fresh()
        mgr.restore(1, target={"model": target_model, "optimizer": target_opt}, include=["model", "optimizer"])
        plain = mgr.restore(1)
    assert_same(expected["model"], target_model.state_dict())  # on DEVICE, bit for bit
    assert_same(expected["optimizer"], target_opt.state_dict())  # moments on DEVICE, "step" where torch keeps it
    assert plain["step"] == 1
    assert_same(expected, {k: plain[k] for k in expected}, devices=False)
    assert all(t.device.type == "cpu" for t in _tensors(plain))  # map_location defaults to the CPU
    # the restored model and optimizer train on exactly as the originals do
    batch = _batch()
    for m, o in ((model, opt), (target_model, target_opt)):
        o.zero_grad()
        m(batch).pow(2).mean().backward()
        o.step()
    assert_same(_cloned(model.state_dict()), target_model.state_dict())


# --- 2. safe snapshots -------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_safe_async_save_holds_the_values_at_the_call_despite_queued_and_later_gpu_writes(tmp_path, writer):
    n = 2048 if ON_CUDA else 128  # 16 MiB on the GPU: small enough for any /dev/shm (writer process)
    torch.manual_seed(0)
    a = torch.randn(n, n, device=DEVICE) / n**0.5
    w = torch.zeros(n, n, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    _sync()
    with _manager(tmp_path, async_save=True, writer=writer) as mgr:
        # queued before save(), not finished when it is called: the side stream must wait for them
        _keep_gpu_busy()
        x = a
        for _ in range(4):
            x = x @ a
        torch.matmul(x, a, out=w)
        b.mul_(3.0)
        expected = {"w": w.clone(), "b": b.clone()}  # stream-ordered after the writes
        mgr.save(1, {"w": w, "b": b, "nested": {"w_again": w}})
        # queued right after save() returned, in place, on the current stream
        w.add_(1.0)
        b.mul_(-1.0)
        torch.matmul(a, a, out=w)
        mgr.wait()
        got = mgr.restore(1, map_location=DEVICE)
    _sync()
    assert not torch.equal(expected["w"], torch.zeros_like(expected["w"]))  # the matmuls did run first
    assert torch.equal(got["w"], expected["w"]) and torch.equal(got["b"], expected["b"])
    assert torch.equal(got["nested"]["w_again"], expected["w"])
    assert got["w"].device.type == DEVICE.type
    assert not torch.equal(w, expected["w"])  # the live tensor did change


# --- 3. overlap snapshots ----------------------------------------------------------------------
def test_overlap_snapshot_holds_the_values_at_the_call_while_forward_and_backward_run(tmp_path):
    model, opt = _trained()
    with _manager(tmp_path, async_save=True, snapshot="overlap") as mgr:
        _keep_gpu_busy()
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # queued behind the busy kernel, before save()
        expected = _cloned(_state(model, opt))
        handle = mgr.save(1, _state(model, opt))
        assert handle is not None
        # forward and backward may run while the writer copies the state ...
        opt.zero_grad()
        model(_batch()).pow(2).mean().backward()
        mgr.wait_for_snapshot()  # ... the optimizer step must wait for the copy
        assert handle._staged.done()
        opt.step()
        mgr.wait()
        restored = mgr.restore(1, map_location=DEVICE)
    assert_same(expected["model"], restored["model"], devices=False)
    assert_same(expected["optimizer"]["state"], restored["optimizer"]["state"], devices=False)
    assert not torch.equal(model[0].weight, expected["model"]["0.weight"])  # the step happened after


def test_overlap_mode_save_with_wait_commits_device_tensors(tmp_path):
    """``save(wait=True)`` under ``snapshot="overlap"`` (what the HF callback does for the last
    save of a run) writes the state itself instead of staging it in the job."""
    model, opt = _trained()
    expected = _cloned(_state(model, opt))
    with _manager(tmp_path, async_save=True, snapshot="overlap") as mgr:
        handle = mgr.save(1, _state(model, opt), wait=True)
        assert handle is not None and handle.done() and handle.exception() is None
        _train_step(model, opt)  # after a committed save: changes nothing in it
        restored = mgr.restore(1)
    assert_same(expected, restored, devices=False)


# --- 4. staging memory -------------------------------------------------------------------------
@cuda_only
def test_cuda_staging_buffers_are_pinned_aligned_reused_and_filled_on_a_side_stream(tmp_path):
    model, opt = _trained()
    with _manager(tmp_path, async_save=True, keep_last=1) as mgr:
        mgr.save(1, _state(model, opt))
        mgr.wait()
        stager = mgr._persister.stager
        arena = stager.arena(0)
        assert arena is not None
        for group, block in arena.memory.items():
            assert block.is_pinned(), f"staging block {group} is not pinned"
            assert block.data_ptr() % ALIGN == 0
        assert all(view.is_pinned() and view.device.type == "cpu" for view in arena.views.values())
        first = {k: v.data_ptr() for k, v in arena.views.items()}
        assert stager._stream is not None and stager._stream != torch.cuda.current_stream()
        side = stager._stream
        _train_step(model, opt)
        expected = _cloned(_state(model, opt))
        mgr.save(2, _state(model, opt))
        mgr.wait()
        assert stager.arena(0) is arena  # same keys, shapes, dtypes: the same buffers
        assert {k: v.data_ptr() for k, v in stager.arena(0).views.items()} == first
        assert stager._stream is side
        assert_same(expected, mgr.restore(2), devices=False)


@cuda_only
@pytest.mark.parametrize("nbytes", [1, ALIGN - 1, ALIGN, 3 * ALIGN + 5, 8 << 20])
def test_a_pinned_staging_block_is_pinned_page_aligned_and_its_whole_storage(nbytes):
    block = stager_module._aligned_bytes(nbytes, True, False)
    storage = block.untyped_storage()
    assert block.is_pinned() and block.numel() == nbytes and block.data_ptr() % ALIGN == 0
    assert storage.data_ptr() == block.data_ptr() and storage.nbytes() == nbytes
    block.fill_(7)
    assert int(block[-1]) == 7


def test_a_staged_optimizer_file_of_device_state_holds_exactly_its_bytes(tmp_path):
    """``torch.save`` of staged tensors (the HF Trainer's ``optimizer.pt``) from a device optimizer:
    one storage record of exactly the state's bytes (pinned memory with no slack), loadable."""
    from ckpt_plugins.hf.native import _torch_save

    _, opt = _trained()
    expected = _cloned(opt.state_dict())
    with _manager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, {"x": torch.zeros(3)}, extra_files={"optimizer.pt": StagedFile(opt.state_dict(), _torch_save)})
        mgr.wait()
    path = tmp_path / "run" / "step_1" / "optimizer.pt"
    with zipfile.ZipFile(path) as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename]
    state_bytes = sum(t.numel() * t.element_size() for s in expected["state"].values() for t in s.values())
    assert len(data) == 1, [(i.filename, i.file_size) for i in data]  # one staging block: one storage record
    assert data[0].file_size == state_bytes  # no slack from the (pinned) allocation
    loaded = torch.load(path, weights_only=True)
    assert_same(expected["state"], loaded["state"], devices=False)


# --- 5. the memory tier ------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["safe", "overlap"])
def test_memory_tier_snapshots_a_device_state_every_step_and_restores_it_onto_the_device(tmp_path, shm_of, overlap):
    shm = shm_of(tmp_path)
    model, opt = _trained()
    expected: dict[int, Any] = {}
    options: dict[str, Any] = {"async_save": True, "snapshot": "overlap"} if overlap else {}
    with CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(keep=2), persist_every_n_steps=3, **options) as mgr:
        for step in range(1, 8):
            _train_step(model, opt, mgr.wait_for_snapshot if overlap else None)
            expected[step] = _cloned(_state(model, opt))
            handle = mgr.save(step, _state(model, opt))
            assert handle is not None
        mgr.wait()
        assert mgr.steps() == [3, 6]
        assert mgr._memory.tier.steps() == [6, 7]
        if DEVICE.type == "cuda":  # straight into the page-locked files: no pinned staging buffer
            tier = mgr._memory.tier
            assert tier._stager is None
            assert tier.mapped._maps and all(m._registered for m in tier.mapped._maps.values())
        assert mgr.latest_step() == 7
        target_model, target_opt = _fresh()
        mgr.restore("latest", target={"model": target_model, "optimizer": target_opt})
        assert mgr.restored_step == 7 and mgr.last_restore_report.source.startswith(shm)
        assert_same(expected[7]["model"], target_model.state_dict())
        assert_same(expected[7]["optimizer"], target_opt.state_dict())
        six = mgr.restore(6, map_location=DEVICE)
        assert mgr.last_restore_report.source.startswith(shm)
        assert all(t.device.type == DEVICE.type for t in _tensors(six["model"]))
        assert_same(expected[6]["model"], six["model"], devices=False)
    assert not os.path.exists(shm)  # closing persisted step 7 and freed the shared memory
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=3) as mgr:
        assert mgr.steps() == [3, 6, 7]
        target_model, target_opt = _fresh()
        mgr.restore("latest", target={"model": target_model, "optimizer": target_opt})
        assert mgr.restored_step == 7
    assert_same(expected[7]["model"], target_model.state_dict())
    assert_same(expected[7]["optimizer"], target_opt.state_dict())
    assert not os.path.exists(shm)


def test_a_new_manager_restores_a_device_state_from_the_memory_a_crashed_one_left(tmp_path, shm_of):
    shm = shm_of(tmp_path)
    model, opt = _trained()
    mgr = CheckpointManager(tmp_path, memory_tier=MemoryTierOptions(keep=2), persist_every_n_steps=5)
    for step in range(1, 8):
        _train_step(model, opt)
        mgr.save(step, _state(model, opt))
    expected = _cloned(_state(model, opt))
    tier = mgr._memory.tier
    tier.settle()
    mgr._memory = None  # leave the shared memory as a crash would (tests/memory's idiom)
    mgr.close()
    assert os.path.isdir(shm)
    with CheckpointManager(tmp_path, memory_tier=True, persist_every_n_steps=5) as mgr:
        assert mgr.steps() == [5] and mgr.latest_step() == 7
        target_model, target_opt = _fresh()
        mgr.restore("latest", target={"model": target_model, "optimizer": target_opt})
        assert mgr.restored_step == 7 and mgr.last_restore_report.source.startswith(shm)
    assert_same(expected["model"], target_model.state_dict())
    assert_same(expected["optimizer"], target_opt.state_dict())
    assert not os.path.exists(shm)  # persisted at close, then freed
    with CheckpointManager(tmp_path, read_only=True) as mgr:
        assert mgr.steps() == [5, 7]
    tier.close()  # the "crashed" manager's mappings of the files removed above
    tier.mapped.close()


# --- 6. across devices -------------------------------------------------------------------------
def test_a_cpu_checkpoint_restores_onto_the_device_and_a_device_one_onto_the_cpu(tmp_path):
    torch.manual_seed(0)
    cpu_model = torch.nn.Linear(16, 4)
    cpu_state = _cloned(cpu_model.state_dict())
    with CheckpointManager(tmp_path / "from-cpu") as mgr:
        mgr.save(1, {"model": cpu_model.state_dict()}, rank_state={"r": torch.arange(3)})
        got = mgr.restore(1, map_location=DEVICE)
        assert all(t.device.type == DEVICE.type for t in _tensors(got))
        assert_same(cpu_state, got["model"], devices=False)
        rank = mgr.restore_rank_state(1, map_location=DEVICE)
        assert rank["r"].device.type == DEVICE.type and torch.equal(rank["r"].cpu(), torch.arange(3))
        torch.manual_seed(1)
        target = torch.nn.Linear(16, 4).to(DEVICE)
        mgr.restore(1, target={"model": target})
        assert all(p.device.type == DEVICE.type for p in target.parameters())
        assert_same(cpu_state, target.state_dict(), devices=False)

    model, opt = _trained()
    expected = _cloned(_state(model, opt))
    with CheckpointManager(tmp_path / "from-device", async_save=True) as mgr:
        mgr.save(1, _state(model, opt))
        mgr.wait()
        got = mgr.restore(1, map_location="cpu")
        assert all(t.device.type == "cpu" for t in _tensors(got))
        assert_same(expected, got, devices=False)
        torch.manual_seed(1)
        cpu_target = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        mgr.restore(1, target={"model": cpu_target}, include="model")
    assert all(p.device.type == "cpu" for p in cpu_target.parameters())
    assert_same(expected["model"], cpu_target.state_dict(), devices=False)


# --- 7. Lightning ------------------------------------------------------------------------------
def _lightning_fit(callbacks, steps, *, ckpt_path=None, plugins=None, strategy="auto"):
    """A real Lightning fit of lightning_train's Net on DEVICE; asserts that it trained there (after
    ``fit`` Lightning's single-device teardown moves the module and optimizers to the CPU)."""
    from torch.utils.data import DataLoader

    import lightning as L
    from lightning_train import Net, data

    class OnDevice(L.Callback):
        def __init__(self) -> None:
            self.seen: set[str] = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.update(p.device.type for p in pl_module.parameters())
            for opt in trainer.optimizers:
                self.seen.update(t.device.type for s in opt.state.values() for t in s.values() if t.dim() > 0)

    probe = OnDevice()
    L.seed_everything(0)
    model = Net()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=ACCELERATOR,
        devices=1,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, probe],
        plugins=plugins,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data(96), batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    assert probe.seen == {DEVICE.type}, f"trained on {probe.seen}, not on {DEVICE.type}"
    return trainer, model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("snapshot", ["safe", "overlap"])
def test_lightning_callback_on_the_device_resumes_exactly_like_a_straight_run(tmp_path, snapshot):
    from ckpt_plugins.lightning import CheckpointCallback, CheckpointIOPlugin, read_lightning_checkpoint
    from lightning_names import path_of, steps_in

    def callback(directory: Path) -> CheckpointCallback:
        return CheckpointCallback(directory, every_n_train_steps=4, snapshot=snapshot)

    def plugins() -> list[Any] | None:  # the safe run also reads and writes through our CheckpointIO
        return [CheckpointIOPlugin(async_save=True)] if snapshot == "safe" else None

    _, straight = _lightning_fit([callback(tmp_path / "ref")], 12, plugins=plugins())
    _lightning_fit([callback(tmp_path / "run")], 8, plugins=plugins())  # stops after step 8
    assert steps_in(tmp_path / "run")[-1] == 8
    trainer, resumed = _lightning_fit([callback(tmp_path / "run")], 12, ckpt_path="last", plugins=plugins())
    assert trainer.global_step == 12
    assert_same(_weights(straight), _weights(resumed))
    stored = read_lightning_checkpoint(path_of(tmp_path / "run", 12), map_location=DEVICE)
    assert stored["global_step"] == 12
    assert_same(_weights(resumed), stored["state_dict"], devices=False)
    assert all(t.device.type == DEVICE.type for t in stored["state_dict"].values())


def test_lightning_checkpoint_io_plugin_on_the_device_writes_and_resumes_like_torch_io(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ckpt_plugins.files.single_file import is_single_file
    from ckpt_plugins.lightning import CheckpointIOPlugin
    from ckpt_plugins.storage import LocalStorage

    def checkpoint(directory: Path) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=directory, every_n_train_steps=4, save_top_k=-1, save_last=True)

    def plugins(ours: bool) -> list[Any] | None:
        return [CheckpointIOPlugin(async_save=True)] if ours else None

    finals = {}
    for ours in (False, True):
        directory = tmp_path / ("ours" if ours else "torch")
        _lightning_fit([checkpoint(directory)], 8, plugins=plugins(ours))
        trainer, model = _lightning_fit([checkpoint(directory)], 12, ckpt_path="last", plugins=plugins(ours))
        assert trainer.global_step == 12
        finals[ours] = _weights(model)
    assert_same(finals[False], finals[True])  # the same resume, through our files
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "torch"))
    last = tmp_path / "ours" / "last.ckpt"
    assert is_single_file(LocalStorage(), str(last))
    plugin = CheckpointIOPlugin()
    loaded = plugin.load_checkpoint(last, map_location=DEVICE)
    plugin.teardown()
    assert loaded["global_step"] == 12
    assert all(t.device.type == DEVICE.type for t in loaded["state_dict"].values())
    assert_same(finals[True], loaded["state_dict"], devices=False)


@cuda_only
def test_lightning_fsdp_on_one_gpu_resumes_exactly_like_a_straight_run(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ckpt_plugins.lightning import CheckpointCallback
    from lightning_names import path_of, steps_in
    from ports import free_port

    def full_weights(trainer) -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(trainer.strategy.model):
            return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()}

    def fit(directory: Path, steps: int, ckpt_path: str | None = None):
        callback = CheckpointCallback(directory, every_n_train_steps=4)
        return _lightning_fit([callback], steps, ckpt_path=ckpt_path, strategy=FSDPStrategy(state_dict_type="sharded"))

    environ = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        trainer, _ = fit(tmp_path / "ref", 12)
        straight = full_weights(trainer)
        fit(tmp_path / "run", 8)
        assert steps_in(tmp_path / "run")[-1] == 8
        manifest = json.loads((path_of(tmp_path / "run", 8) / "manifest.json").read_text())
        assert manifest.get("sharded"), "FSDP saved no sharded state"
        trainer, _ = fit(tmp_path / "run", 12, ckpt_path="last")
        assert trainer.global_step == 12
        assert_same(straight, full_weights(trainer))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


# --- 8. the HF Trainer -------------------------------------------------------------------------
HF_STEPS = 12


def _hf_trainer(out: Path, steps: int, callback: dict | None, extra_callbacks=(), **overrides):
    """hf_train's tiny GPT-2 Trainer on DEVICE, with eager attention (its backward is deterministic
    on CUDA, unlike the fused SDPA kernels'), nothing downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    import hf_train
    from ckpt_plugins.hf import CheckpointCallback

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=hf_train.VOCAB, n_positions=hf_train.LENGTH, n_embd=32, n_layer=2, n_head=2)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    args = hf_train.training_args(out, steps, use_cpu=not ON_CUDA, **overrides)
    callbacks = [CheckpointCallback(**callback)] if callback is not None else []
    return Trainer(
        model=model,
        args=args,
        train_dataset=hf_train.TokenDataset(48),
        callbacks=callbacks + list(extra_callbacks),
    )


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAt()


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """Final weights of uninterrupted HF runs without checkpoints, per gradient checkpointing."""
    cache: dict[bool, dict[str, torch.Tensor]] = {}

    def get(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
        if gradient_checkpointing not in cache:
            out = tmp_path_factory.mktemp(f"hf-ref-{gradient_checkpointing}")
            trainer = _hf_trainer(
                out, HF_STEPS, None, save_strategy="no", gradient_checkpointing=gradient_checkpointing
            )
            trainer.train()
            cache[gradient_checkpointing] = _weights(trainer.model)
        return cache[gradient_checkpointing]

    return get


@pytest.mark.parametrize(
    "options, gradient_checkpointing",
    [({}, False), ({"snapshot": "overlap"}, False), ({}, True)],
    ids=["safe", "overlap", "gradient-checkpointing"],
)
def test_hf_trainer_on_the_device_resumes_exactly_from_our_checkpoints(
    tmp_path, hf_reference, options, gradient_checkpointing
):
    from transformers.trainer_utils import get_last_checkpoint

    from ckpt_plugins.hf import CheckpointCallback

    kwargs = dict(gradient_checkpointing=gradient_checkpointing)
    interrupted = _hf_trainer(tmp_path, HF_STEPS, options, [_stop_at(7)], **kwargs)
    assert interrupted.args.device.type == DEVICE.type
    interrupted.train()
    assert next(p for p in interrupted.model.parameters()).device.type == DEVICE.type
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")

    resumed = _hf_trainer(tmp_path, HF_STEPS, options, **kwargs)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == HF_STEPS
    final = _weights(resumed.model)
    assert_same(hf_reference(gradient_checkpointing), final)
    if gradient_checkpointing:
        from ckpt_plugins.activation.hf import checkpointed_layers

        assert len(checkpointed_layers(resumed.model)) == 2  # transformers' own, on both GPT-2 blocks
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    assert [s.step for s in callback.saves] == [8, 12]
    with CheckpointManager(tmp_path, read_only=True, dir_prefix="checkpoint-") as mgr:
        assert mgr.steps() == [4, 8, 12]
        assert mgr.verify(12) == []
    stored = load_file(tmp_path / "checkpoint-12" / "model.safetensors")
    assert_same({k: v for k, v in final.items() if k in stored}, stored, devices=False)
