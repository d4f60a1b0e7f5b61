"""Two real processes with torch.distributed (gloo on CPU) sharing one checkpoint directory."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt_plugins import CheckpointManager, DistributedError, SaveError
from ports import free_port


def _spawn(fn, tmp_path, *args):
    port = free_port()
    errors = mp.get_context("spawn").Manager().dict()
    mp.spawn(_entry, args=(fn, str(tmp_path), port, errors, args), nprocs=2, join=True)
    if errors:
        pytest.fail("\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(errors.items())))


def _entry(rank, fn, directory, port, errors, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, directory, *args)
    except BaseException:
        errors[rank] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


def _save_retain_resume(rank, directory, async_save):
    with CheckpointManager(directory, keep_last=2, async_save=async_save) as mgr:
        for step in (1, 2, 3):
            rng = {"torch": torch.get_rng_state(), "rank": rank, "marker": torch.full((3,), float(rank * 10 + step))}
            mgr.save(step, {"w": torch.full((4,), float(step)), "step": step}, rank_state=rng)
        mgr.wait()
        assert mgr.steps() == [2, 3]
    dist.barrier()
    with CheckpointManager(directory) as mgr:
        state = mgr.restore("latest")
        assert state["step"] == 3 and torch.equal(state["w"], torch.full((4,), 3.0))
        mine = mgr.restore_rank_state("latest")
        assert mine["rank"] == rank and torch.equal(mine["marker"], torch.full((3,), float(rank * 10 + 3)))
        other = mgr.restore_rank_state("latest", rank=1 - rank)
        assert other["rank"] == 1 - rank
    files = sorted(os.listdir(os.path.join(directory, "step_3")))
    assert files == ["manifest.json", "rank_0.safetensors", "rank_1.safetensors", "state.safetensors"], files


@pytest.mark.parametrize("async_save", [False, True])
def test_two_ranks_save_retain_and_restore(tmp_path, async_save):
    _spawn(_save_retain_resume, tmp_path, async_save)


def _mismatched_steps(rank, directory):
    with CheckpointManager(directory) as mgr:
        try:
            mgr.save(10 + rank, {"w": torch.ones(2)})
        except DistributedError as exc:
            assert "rank 0: 10, rank 1: 11" in str(exc)
        else:
            raise AssertionError("a step mismatch was not detected")
        assert mgr.steps() == []


def test_ranks_disagreeing_on_the_step_fail_on_every_rank(tmp_path):
    _spawn(_mismatched_steps, tmp_path)


def _one_rank_fails(rank, directory):
    with CheckpointManager(directory, async_save=True, rank_timeout=30) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, rank_state={"r": torch.ones(1)})
        mgr.wait()
        # Rank 1 cannot write its tensor file (an injected ENOSPC).
        if rank == 1:
            original = mgr.storage.open_write
            mgr.storage.open_write = lambda path: _fail_tensor_files(original, path)
        mgr.save(2, {"w": torch.ones(2)}, rank_state={"r": torch.ones(1)})
        try:
            mgr.wait()
        except SaveError as exc:
            assert "rank 1" in str(exc) or "rank 0" in str(exc)
        else:
            raise AssertionError("the failure of one rank did not reach every rank")
        assert mgr.steps() == [1]


def _fail_tensor_files(original, path):
    if path.endswith(".safetensors"):
        raise OSError(28, "No space left on device (injected)", path)
    return original(path)


def test_a_failing_rank_gives_a_clear_error_on_all_ranks(tmp_path):
    _spawn(_one_rank_fails, tmp_path)


def _unstorable_on_rank_0(rank, directory):
    with CheckpointManager(directory) as mgr:
        state = {"w": torch.ones(2), "fn": (lambda: 0) if rank == 0 else 0}
        try:
            mgr.save(1, state)
        except Exception as exc:
            assert type(exc).__name__ == "UnsupportedStateError" and "rank 0" in str(exc), exc
        else:
            raise AssertionError("rank 1 did not hear that rank 0's state cannot be stored")
        mgr.save(2, {"w": torch.ones(2)})  # and the group is still usable
        assert mgr.steps() == [2]


def test_unstorable_state_on_one_rank_fails_every_rank(tmp_path):
    _spawn(_unstorable_on_rank_0, tmp_path)


def _single_rank_manager(rank, directory):
    if rank == 0:  # as Lightning's CheckpointIO: only rank 0 calls save, without collectives
        with CheckpointManager(directory, distributed=False, async_save=True) as mgr:
            mgr.save(1, {"w": torch.ones(2)})
            mgr.wait()
            assert mgr.steps() == [1]
    dist.barrier()


def test_distributed_false_makes_a_world_of_one(tmp_path):
    _spawn(_single_rank_manager, tmp_path)
