"""The marker of tests that run only in ``make soak`` (``CKPT_SOAK=1``)."""

from __future__ import annotations

import os

import pytest


def soak_only(why: str) -> pytest.MarkDecorator:
    """Skip unless ``CKPT_SOAK`` is set; ``why`` says what the test costs and which fast test covers it."""
    return pytest.mark.skipif(not os.environ.get("CKPT_SOAK"), reason=f"CKPT_SOAK=1 (make soak): {why}")


MIRROR_DDP_X2 = (
    "a two-process launch, ~25 s; the fast DDP x2 case is tests/core/storage/test_s3_mirror.py::"
    "test_two_ranks_save_through_a_mirror_and_rank_0_uploads_the_manifest_last"
)
