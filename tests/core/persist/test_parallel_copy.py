"""The staging copy on several threads (persist/hashed_copy): every byte lands where it belongs and
the checksum is the file's whatever the thread count; work is claimed, so a slow thread holds up
at most its own chunk; a failure stops every thread; copies beside training keep to one thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ckpt_plugins import CheckpointManager
from ckpt_plugins.files.checksum import CHUNK, FileHasher
from ckpt_plugins.persist import hashed_copy
from ckpt_plugins.persist.stager import HostStager


def _tensors() -> dict[str, torch.Tensor]:
    """Tensors that straddle chunk boundaries at odd offsets, next to ones a memmove cannot copy."""
    gen = torch.Generator().manual_seed(3)
    return {
        "state/a": torch.randn(CHUNK // 4 + 3, generator=gen),  # one chunk and 12 bytes
        "state/b": torch.randint(0, 255, (CHUNK + 5,), dtype=torch.uint8, generator=gen),  # odd size
        "state/c": torch.randn(2 * CHUNK // 8 + 1, dtype=torch.float64, generator=gen),
        "state/t": torch.randn(17, 9, generator=gen).t(),  # copied by copy_
        "state/e": torch.empty(0),
        "state/s": torch.tensor(1.5),
    }


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("head_size", [0, 40, CHUNK + 100])  # none, a header, one longer than a chunk
def test_copy_and_hash_gives_the_files_checksum_on_any_number_of_threads(threads, head_size):
    tensors = _tensors()
    stager = HostStager(1)
    stager.reserve(0, tensors)
    arena = stager.arena(0)
    block = arena.memory["state"]
    pairs = [(arena.views[k], tensors[k]) for k in arena.order["state"]]
    head = bytes(range(256)) * (head_size // 256) + bytes(head_size % 256)
    digest = hashed_copy.copy_and_hash(pairs, head, block, threads)
    expected = FileHasher(head)
    expected.update(block.numpy().tobytes())
    assert digest == expected.hexdigest()
    for key, value in tensors.items():
        assert torch.equal(arena.views[key], value), key


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_copy_pieces_copies_every_byte(threads):
    tensors = _tensors()
    targets = {k: torch.full_like(v.contiguous(), 0) for k, v in tensors.items()}
    hashed_copy.copy_pieces([(targets[k], v) for k, v in tensors.items()], threads)
    for key, value in tensors.items():
        assert torch.equal(targets[key], value), key


def test_an_empty_block_hashes_as_an_empty_file():
    empty = FileHasher(b"")
    assert hashed_copy.copy_and_hash([], b"", torch.empty(0, dtype=torch.uint8), 2) == empty.hexdigest()


def test_a_slow_thread_holds_up_only_the_chunk_it_claimed():
    """The caller takes the chunks a slowed helper does not get to (fixed halves would make the
    caller wait for the helper's half)."""
    done_by: list[str] = []

    def work(i: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        done_by.append(threading.current_thread().name)

    t0 = time.perf_counter()
    hashed_copy._claim_all(20, work, threads=2)
    assert len(done_by) == 20
    assert done_by.count(hashed_copy.THREAD_NAME) <= 2
    assert time.perf_counter() - t0 < 1.0  # not 10 chunks x 0.2 s


def test_a_failure_on_a_helper_stops_the_claims_and_reaches_the_caller():
    claimed: list[int] = []
    working = [0]

    def work(i: int) -> None:
        claimed.append(i)
        working[0] += 1
        try:
            if threading.current_thread() is not threading.main_thread():
                raise OSError("copy failed")
            time.sleep(0.01)
        finally:
            working[0] -= 1

    with pytest.raises(OSError, match="copy failed"):
        hashed_copy._claim_all(1000, work, threads=3)
    after = len(claimed)
    time.sleep(0.05)
    assert after < 1000 and len(claimed) == after and working[0] == 0  # nothing runs on after the raise
    targets = [torch.zeros(3 << 20)]
    hashed_copy.copy_pieces([(targets[0], torch.ones(3 << 20))], threads=3)  # the helpers still serve
    assert bool(targets[0].eq(1).all())


def test_a_helper_that_starts_late_finds_nothing_to_wait_for():
    """The caller does not wait for a helper that has not started: all work done, it returns."""
    job = hashed_copy._Job(3, lambda i: None)
    job.claim_and_work()
    job.finish()  # no helper took an item: returns at once
    job.claim_and_work(helper=True)  # a late helper: nothing left to claim
    job.finish()


def test_copy_threads_default_to_the_cores_at_most_max_threads(monkeypatch):
    monkeypatch.setattr(hashed_copy, "cores", lambda: 16)
    assert hashed_copy.copy_threads() == hashed_copy.MAX_THREADS
    monkeypatch.setattr(hashed_copy, "cores", lambda: 2)
    assert hashed_copy.copy_threads() == 2
    assert hashed_copy.copy_threads(1) == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"async_save": True}, None),  # default mode: the caller waits, every core copies
        ({"async_save": True, "snapshot": "overlap"}, 1),  # beside training: one thread
        ({"async_save": True, "memory_tier": True, "persist_every_n_steps": 100}, None),
        ({"async_save": True, "snapshot": "overlap", "memory_tier": True, "persist_every_n_steps": 100}, 1),
    ],
)
def test_copies_beside_training_keep_to_one_thread(tmp_path, shm_of, monkeypatch, options, expected):
    shm_of(tmp_path)
    asked: list[int | None] = []
    real = hashed_copy.copy_threads

    def recording(threads: int | None = None) -> int:
        asked.append(threads)
        return real(threads)

    monkeypatch.setattr(hashed_copy, "copy_threads", recording)
    state = {"w": torch.randn(1 << 20), "step": 1}
    with CheckpointManager(tmp_path, **options) as mgr:
        mgr.save(1, state)
        mgr.wait_for_snapshot()
        mgr.wait()
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    assert asked and set(asked[:1]) == {expected}


def test_a_helper_stopped_from_outside_is_replaced_at_the_next_copy():
    # Lightning's test suite calls stop() on every daemon thread a test leaves and fails the test
    # if one is still alive after it: the pool's threads stop and join, and the next copy that
    # needs help starts a new one.
    src = [torch.randn(3 * hashed_copy.PIECE // 4, generator=torch.Generator().manual_seed(1))]
    dst = [torch.empty_like(src[0])]
    hashed_copy.copy_pieces(list(zip(dst, src, strict=True)), threads=2)
    helpers = [t for t in threading.enumerate() if t.name == hashed_copy.THREAD_NAME]
    assert helpers
    for helper in helpers:
        helper.stop()  # type: ignore[attr-defined]
        assert not helper.is_alive()
    dst[0].zero_()
    hashed_copy.copy_pieces(list(zip(dst, src, strict=True)), threads=2)
    assert torch.equal(dst[0], src[0])
    fresh = [t for t in threading.enumerate() if t.name == hashed_copy.THREAD_NAME]
    assert fresh and not set(fresh) & set(helpers)
