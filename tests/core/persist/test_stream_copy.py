"""The streaming-store copy (persist/_stream_copy.c): exact bytes at every size and alignment,
nothing written outside the destination, the GIL released, and the copies that use it
(persist/hashed_copy.copy_pieces) give the same bytes as with ``memmove``."""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

import pytest
import torch

from ckpt_plugins.persist import hashed_copy

stream_copy = pytest.importorskip("ckpt_plugins.persist._stream_copy")

GUARD = 128  # bytes checked on either side of the destination


def test_the_dev_install_compiles_it_where_a_compiler_is():
    # make test's .venv comes from `pip install -e .`, which builds the extension (setup.py); on
    # x86-64 Linux it must stream, or every copy silently falls back to memmove.
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        assert stream_copy.STREAMS == 1
    assert hashed_copy.STREAMING_COPY is stream_copy.copy


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 4095, 256 << 10, (256 << 10) + 77, (3 << 20) + 5])
@pytest.mark.parametrize(("dst_off", "src_off"), [(0, 0), (1, 0), (0, 7), (63, 33), (17, 17)])
def test_every_byte_lands_and_nothing_outside_the_destination_changes(size, dst_off, src_off):
    gen = torch.Generator().manual_seed(size + dst_off)
    src = torch.randint(0, 256, (size + src_off + 64,), dtype=torch.uint8, generator=gen)
    dst = torch.full((size + dst_off + 2 * GUARD,), 0xA5, dtype=torch.uint8)
    start = GUARD + dst_off
    stream_copy.copy(dst.data_ptr() + start, src.data_ptr() + src_off, size)
    assert torch.equal(dst[start : start + size], src[src_off : src_off + size])
    assert bool((dst[:start] == 0xA5).all()) and bool((dst[start + size :] == 0xA5).all())


def test_overlapping_ranges_are_copied_as_memmove_would():
    data = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)  # 4 MiB, above the streaming size
    expected = data.clone()
    expected[4096:] = data[: data.numel() - 4096].clone()
    stream_copy.copy(data.data_ptr() + 4096, data.data_ptr(), data.numel() - 4096)
    assert torch.equal(data, expected)


def test_a_negative_size_is_refused():
    buf = ctypes.create_string_buffer(8)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        stream_copy.copy(ctypes.addressof(buf), ctypes.addressof(buf), -1)


def test_it_releases_the_gil():
    # A Python thread spins on a counter. Holding the GIL, the copy would leave the counter exactly
    # where it was read before the call; released, the counter moves during the copy. A long switch
    # interval keeps the interpreter itself from handing the GIL over between the read and the call.
    old_interval = sys.getswitchinterval()
    src = torch.ones(128 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ticks, done = [0], threading.Event()

    def count() -> None:
        while not done.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    sys.setswitchinterval(0.1)
    try:
        counter.start()
        moved = []
        for _ in range(3):
            before = ticks[0]
            stream_copy.copy(dst.data_ptr(), src.data_ptr(), src.numel())
            moved.append(ticks[0] - before)
    finally:
        done.set()
        counter.join()
        sys.setswitchinterval(old_interval)
    assert all(m > 0 for m in moved), moved
    assert torch.equal(dst, src)


@pytest.mark.parametrize("streaming", [True, False])
def test_copy_pieces_gives_the_same_bytes_with_or_without_it(monkeypatch, streaming):
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(n, generator=gen) for n in (3, (5 << 20) // 4 + 1, 1 << 18, 7)]
    sources.append(torch.randn(33, 17, generator=gen).t())  # not plain bytes: copy_
    block = torch.empty(sum(s.numel() for s in sources) * 4 + 4, dtype=torch.uint8)
    views, off = [], 4  # the views start 4 bytes in: unaligned, as in a gapless file
    for s in sources:
        views.append(block[off : off + s.numel() * 4].view(torch.float32).view(s.shape))
        off += s.numel() * 4
    calls: list[int] = []
    real = stream_copy.copy

    def spy(dst: int, src: int, n: int) -> None:
        calls.append(n)
        real(dst, src, n)

    monkeypatch.setattr(hashed_copy, "STREAMING_COPY", spy if streaming else None)
    hashed_copy.copy_pieces(list(zip(views, sources, strict=True)), threads=2)
    for view, source in zip(views, sources, strict=True):
        assert torch.equal(view, source)
    assert (sum(calls) > 0) == streaming  # used when present, never when absent
