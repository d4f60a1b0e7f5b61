"""The CLI's fsspec options: ``--storage-options JSON`` (or ``CKPT_PLUGINS_STORAGE_OPTIONS``).

Every command opens its paths through :func:`open_path`, so one flag reaches every URL a command
reads (``ckpt-plugins ls s3://bucket/run --storage-options '{"client_kwargs": {"endpoint_url":
"http://..."}}'``). Without it, s3fs finds the endpoint and credentials the standard ways
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, config files, roles). The value is
never printed: an error names the flag, not what was passed (it may hold a secret).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import check_storage_options
from ckpt_plugins.storage import Storage, open_storage

__all__ = ["ENV_NAME", "open_path", "options", "set_options"]

ENV_NAME = "CKPT_PLUGINS_STORAGE_OPTIONS"

_current: dict[str, Any] | None = None  # this command's options (main() sets them first)


def set_options(text: str | None) -> None:
    """Parse ``--storage-options`` (else the environment variable) for this command."""
    global _current
    source = "--storage-options" if text is not None else ENV_NAME
    text = text if text is not None else os.environ.get(ENV_NAME)
    if not text:
        _current = None
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source} must be a JSON object of fsspec options, for example "
            f'\'{{"client_kwargs": {{"endpoint_url": "http://127.0.0.1:9000"}}}}\' (not valid JSON: {exc.msg} '
            f"at character {exc.pos})",
            option=source,
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object of fsspec options, got a JSON {type(value).__name__}")
    check_storage_options(source, value)
    _current = value


def options() -> dict[str, Any] | None:
    """This command's fsspec options (None: the environment's defaults)."""
    return _current


def open_path(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """``open_storage`` with this command's options."""
    return open_storage(path, _current)
