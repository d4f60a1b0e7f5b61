"""Type and range checks for option values: the one copy every options group and rule uses.

Each check raises a :class:`~ckpt_plugins.errors.ConfigError` whose ``option`` is the option's
name and whose message shows the value and what to pass instead. Nothing here converts a value:
a check accepts it as given or refuses it (``"5"`` is not an integer, ``1`` is not a bool).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from ckpt_plugins.errors import ConfigError

__all__ = [
    "check_bool",
    "check_callbacks",
    "check_choice",
    "check_dir_prefix",
    "check_directory",
    "check_int_range",
    "check_metric",
    "check_mode",
    "check_name_template",
    "check_positive_int",
    "check_seconds",
    "check_signal_names",
    "check_step",
    "check_storage_options",
]


def _name(option: str) -> str:
    """The option as a ``$name`` placeholder an adapter can rename (plain text if not a bare name)."""
    return f"${option}" if option.isidentifier() else option


def check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{_name(option)} must be True or False, got {value!r} ({type(value).__name__}); "
            "pass a bool (YAML: true/false)",
            option=option,
            value=value,
        )


def check_positive_int(option: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is an int >= 1 (or None when ``optional``); bools are not ints here."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{_name(option)} must be a positive integer{' or None' if optional else ''}, got {value!r}; "
            "use an int >= 1",
            option=option,
            value=value,
        )


def check_step(option: str, value: Any) -> None:
    """``value`` is a training step: an int >= 0 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{_name(option)} must be a non-negative integer, got {value!r}", option=option, value=value)


def check_int_range(option: str, value: Any, low: int, high: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{_name(option)} must be an integer from {low} to {high} ({what}), got {value!r}",
            option=option,
            value=value,
        )


def check_choice(option: str, value: Any, choices: Sequence[Any], hint: str = "") -> None:
    if not any(value == c and type(value) is type(c) for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(
            f"{_name(option)} must be one of {listed}, got {value!r}{'; ' + hint if hint else ''}",
            option=option,
            value=value,
        )


def check_seconds(option: str, value: Any, *, optional: bool = False, timedelta_ok: bool = False) -> None:
    """A positive, finite number of seconds (or a ``timedelta`` when ``timedelta_ok``)."""
    if optional and value is None:
        return
    seconds = value.total_seconds() if timedelta_ok and isinstance(value, timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (math.isfinite(seconds) and seconds > 0)
    ):
        kind = "number of seconds or a timedelta" if timedelta_ok else "number of seconds"
        raise ConfigError(
            f"{_name(option)} must be a positive, finite {kind}, got {value!r}; for example 3600 for an hour",
            option=option,
            value=value,
        )


def check_metric(option: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{_name(option)} must be a metric name (non-empty str), got {value!r}; for example 'val_loss'",
            option=option,
            value=value,
        )


def check_mode(option: str, value: Any) -> None:
    if value not in ("min", "max") or not isinstance(value, str):
        raise ConfigError(
            f"{_name(option)} must be 'min' or 'max', got {value!r}; use 'min' when lower is better "
            "(a loss) or 'max' when higher is better (an accuracy)",
            option=option,
            value=value,
        )


def check_callbacks(option: str, value: Any) -> None:
    """None, one callable, or a list/tuple of callables."""
    if value is None or callable(value):
        return
    if isinstance(value, (list, tuple)) and all(callable(fn) for fn in value):
        return
    raise ConfigError(
        f"{_name(option)} must be a callable fn(step, path) or a list of them, got {value!r}",
        option=option,
        value=value,
    )


def as_callbacks(value: Callable[..., Any] | Sequence[Callable[..., Any]] | None) -> tuple[Callable[..., Any], ...]:
    """The callables a checked ``on_commit`` value stands for, in order."""
    if value is None:
        return ()
    return (value,) if callable(value) else tuple(value)


def check_dir_prefix(option: str, value: Any) -> None:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value.startswith("."):
        raise ConfigError(
            f"{_name(option)} must be a non-empty folder-name prefix (no '/', not starting with '.'), "
            f"got {value!r}; for example 'step_' or 'checkpoint-'",
            option=option,
            value=value,
        )


def check_name_template(option: str, value: Any) -> None:
    """None, or a template :class:`~ckpt_plugins.layout.naming.NameTemplate` accepts."""
    if value is None:
        return
    from ckpt_plugins.layout.naming import NameTemplate

    try:
        NameTemplate(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{_name(option)}: {exc}; for example 'epoch={{epoch}}-step={{step}}{{version}}.ckpt'",
            option=option,
            value=value,
        ) from None


def check_directory(option: str, value: Any) -> None:
    """A non-empty local path or fsspec URL, as str or ``os.PathLike`` of str."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"{_name(option)} must be a non-empty path or fsspec URL (str or os.PathLike), got {value!r}",
            option=option,
            value=value,
        )


def check_signal_names(option: str, value: Any) -> None:
    """A non-empty list or tuple of catchable signal names (``"SIGTERM"``, ``"SIGUSR1"``, ...)."""
    import signal

    def catchable(name: Any) -> bool:
        signum = getattr(signal, name, None) if isinstance(name, str) and name.startswith("SIG") else None
        return isinstance(signum, signal.Signals) and name not in ("SIGKILL", "SIGSTOP")

    if not isinstance(value, (list, tuple)) or not value or not all(catchable(n) for n in value):
        raise ConfigError(
            f"{_name(option)} must be a non-empty list of signal names this platform can catch, got {value!r}; "
            "for example ['SIGTERM', 'SIGUSR1'] (SIGKILL and SIGSTOP cannot be caught)",
            option=option,
            value=value,
        )


def check_storage_options(option: str, value: Any) -> None:
    """None or a mapping of fsspec options with string keys (``{"key": ..., "client_kwargs":
    {"endpoint_url": ...}}``). The message never shows the value: it may hold a secret."""
    from collections.abc import Mapping

    if value is None or (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        return
    raise ConfigError(
        f"{_name(option)} must be a dict of fsspec options (for s3://: key, secret, "
        f"client_kwargs={{'endpoint_url': ...}}), got a {type(value).__name__}; the CLI takes it as JSON",
        option=option,
    )
