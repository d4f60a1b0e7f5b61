"""The option groups of a :class:`~ckpt_plugins.CheckpointManager`, one frozen dataclass per concern.

Each group checks every field's type and range in ``__post_init__`` and never rewrites a field:
what you passed is what the object holds (``keep_time_interval=timedelta(hours=1)`` stays a
timedelta; derived values such as :attr:`RetentionOptions.interval_s` are properties). Every
failure is a :class:`~ckpt_plugins.errors.ConfigError` naming the option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from ckpt_plugins.errors import ConfigError
from ckpt_plugins.options.checks import (
    as_callbacks,
    check_bool,
    check_callbacks,
    check_choice,
    check_dir_prefix,
    check_int_range,
    check_metric,
    check_mode,
    check_name_template,
    check_positive_int,
    check_seconds,
    check_signal_names,
)

if TYPE_CHECKING:
    from ckpt_plugins.retention.policy import RetentionPolicy

__all__ = [
    "DistributedOptions",
    "IOOptions",
    "PreemptionOptions",
    "RestoreOptions",
    "RetentionOptions",
    "SaveOptions",
]

OnCommit = Callable[[int, str], None] | Sequence[Callable[[int, str], None]] | None


@dataclass(frozen=True)
class RetentionOptions:
    """Which committed checkpoints are kept, and whether a save may go back in steps."""

    keep_last: int | None = None
    """Keep the N most recent checkpoints."""
    keep_best: int | None = None
    """Keep the N best by ``monitor`` (needs ``monitor``)."""
    monitor: str | None = None
    """Metric that ranks checkpoints (``keep_best``, ``best_step()``, ``restore("best")``)."""
    mode: Literal["min", "max"] = "min"
    """``"min"``: lower ``monitor`` is better; ``"max"``: higher is."""
    keep_every_n_steps: int | None = None
    """Keep, for good, steps divisible by N."""
    keep_time_interval: float | timedelta | None = None
    """Keep the first checkpoint of each interval (seconds or a timedelta)."""
    overwrite: bool = False
    """Allow saving at or before an existing step (the later checkpoints are then removed)."""

    def __post_init__(self) -> None:
        for option in ("keep_last", "keep_best", "keep_every_n_steps"):
            check_positive_int(option, getattr(self, option), optional=True)
        check_metric("monitor", self.monitor, optional=True)
        check_mode("mode", self.mode)
        check_seconds("keep_time_interval", self.keep_time_interval, optional=True, timedelta_ok=True)
        check_bool("overwrite", self.overwrite)
        if self.keep_best is not None and self.monitor is None:
            raise ConfigError(
                f"$keep_best={self.keep_best!r} needs $monitor, the metric that ranks checkpoints; "
                "set it to a logged metric's name (for example val_loss)",
                option="keep_best",
                value=self.keep_best,
                mentions=("monitor",),
            )

    @property
    def interval_s(self) -> float | None:
        """``keep_time_interval`` in seconds (None when unset)."""
        value = self.keep_time_interval
        return value.total_seconds() if isinstance(value, timedelta) else None if value is None else float(value)

    @property
    def has_rules(self) -> bool:
        """Whether any ``keep_*`` rule is set (without one, every checkpoint is kept)."""
        return any(
            v is not None for v in (self.keep_last, self.keep_best, self.keep_every_n_steps, self.keep_time_interval)
        )

    def policy(self) -> RetentionPolicy:
        """The retention policy these options stand for (see :func:`~ckpt_plugins.retention.build_policy`)."""
        from ckpt_plugins.retention.policy import policy_for

        return policy_for(self)


@dataclass(frozen=True)
class SaveOptions:
    """How a save runs: synchronous or in the background, how many at once, who writes."""

    async_save: bool = False
    """Return from ``save`` once the state is copied; persist in the background."""
    max_pending: int = 1
    """At most this many saves in flight (and staged copies in memory)."""
    on_busy: Literal["wait", "skip"] = "wait"
    """When ``max_pending`` saves are in flight: ``"wait"`` blocks, ``"skip"`` skips the save."""
    snapshot: Literal["safe", "overlap"] = "safe"
    """``"safe"`` copies inside ``save``; ``"overlap"`` copies in the background (needs ``async_save``)."""
    on_commit: OnCommit = None
    """Callables ``fn(step, path)`` run after every commit (one, or a list/tuple)."""
    on_error: Literal["raise", "warn"] = "raise"
    """A failed background save: ``"raise"`` at the next call, or ``"warn"`` and go on."""
    writer: Literal["thread", "process"] = "thread"
    """``"process"`` writes tensor files in a separate process (needs ``async_save`` and a local directory)."""
    writer_nice: int = 0
    """Lower the writer thread's scheduling priority by this much (Linux nice increment, 0 to 19).
    Measured on 2 cores: less slowdown of training while a persist runs, but a longer persist and
    more training time lost in total; hence 0."""

    def __post_init__(self) -> None:
        check_bool("async_save", self.async_save)
        check_positive_int("max_pending", self.max_pending)
        check_choice("on_busy", self.on_busy, ("wait", "skip"))
        check_choice("snapshot", self.snapshot, ("safe", "overlap"))
        check_callbacks("on_commit", self.on_commit)
        check_choice("on_error", self.on_error, ("raise", "warn"))
        check_choice("writer", self.writer, ("thread", "process"))
        check_int_range("writer_nice", self.writer_nice, 0, 19, "a nice increment; 0 keeps the priority")
        if self.writer == "process" and not self.async_save:
            raise ConfigError(
                "$writer='process' needs $async_save=True (it writes the staged copies)",
                option="writer",
                value=self.writer,
                mentions=("async_save",),
            )
        if self.snapshot == "overlap" and not self.async_save:
            raise ConfigError(
                "$snapshot='overlap' needs $async_save=True (a synchronous save has nothing to overlap with)",
                option="snapshot",
                value=self.snapshot,
                mentions=("async_save",),
            )

    @property
    def callbacks(self) -> tuple[Callable[[int, str], None], ...]:
        """``on_commit`` as a tuple of callables."""
        return as_callbacks(self.on_commit)


@dataclass(frozen=True)
class IOOptions:
    """How the directory is written: folder names, the direct-I/O path, read-only access."""

    direct_io: bool = True
    """Write tensor files with ``O_DIRECT`` (past the page cache: one memory copy instead of the
    page cache's copy and writeback) where the file system supports it, plain writes elsewhere.
    ``False``, or ``CKPT_PLUGINS_DIRECT_IO=0`` in the environment, writes through the page cache."""
    dir_prefix: str = "step_"
    """Checkpoint folders are ``<dir_prefix><step>`` (``checkpoint-`` is the HF Trainer's layout)."""
    name_template: str | None = None
    """Name checkpoints from a template instead of ``<dir_prefix><step>``:
    ``"epoch={epoch}-step={step}{version}.ckpt"`` (``str.format`` fields: ``step``, the save's
    metrics, ``version``: empty, or ``-vN`` when the name is taken). Every name the template can
    produce is listed, ordered, retained and restored by its step (from the name's ``{step}``, else
    from the manifest). See :class:`~ckpt_plugins.layout.naming.NameTemplate`."""
    read_only: bool = False
    """Only list and restore: no lock, no clean-up, ``save`` refused (evaluation jobs, tools that
    read a directory another process is writing)."""
    dedup: bool = False
    """Store a state tensor whose bytes equal the same key's in the previous committed checkpoint
    as a reference to the shared file that holds it instead of a copy (frozen layers, a LoRA
    base); retention keeps a shared file while a kept checkpoint refers to it. See docs/dedup.md."""

    def __post_init__(self) -> None:
        check_bool("direct_io", self.direct_io)
        check_dir_prefix("dir_prefix", self.dir_prefix)
        check_name_template("name_template", self.name_template)
        check_bool("read_only", self.read_only)
        check_bool("dedup", self.dedup)


@dataclass(frozen=True)
class DistributedOptions:
    """Behaviour under ``torch.distributed``."""

    distributed: bool = True
    """Act as one of the ranks; ``False``: a world of one even in a distributed job (no
    collectives; lock, commit and retention in this process), for code that saves on one rank."""
    rank_timeout: float = 600.0
    """Seconds rank 0 waits for the other ranks' files before failing a save."""

    def __post_init__(self) -> None:
        check_bool("distributed", self.distributed)
        check_seconds("rank_timeout", self.rank_timeout)


@dataclass(frozen=True)
class RestoreOptions:
    """Defaults of ``restore``."""

    verify: bool = True
    """Check file checksums when restoring."""
    strict: bool = True
    """Default of ``restore(strict=...)``: a target that does not match is an error."""

    def __post_init__(self) -> None:
        check_bool("verify", self.verify)
        check_bool("strict", self.strict)


@dataclass(frozen=True)
class PreemptionOptions:
    """Saving when the scheduler announces the end (SLURM, Kubernetes, spot instances): on one of
    ``preemption_signals`` the training loop saves at the next step boundary all ranks agree on,
    waits until that checkpoint is durable, stops, and the process then ends with the signal's
    default action (exit status 128 + signal number). See docs/preemption.md."""

    save_on_preemption: bool = True
    """Turn a preemption signal into a save at the next step boundary and a clean stop (adapters;
    a plain loop polls ``CheckpointManager.preemption_requested()``). ``False``: a signal flushes
    pending saves and ends the process, as without this option."""
    preemption_signals: Sequence[str] = ("SIGTERM", "SIGUSR1")
    """The signals that announce a preemption (a list or tuple of names)."""
    preemption_sync_every: int = 10
    """Under ``torch.distributed``: the ranks exchange their preemption flag (one all_reduce of a
    one-element tensor) every this many steps; a signal is acted on at the next such step. One
    process never exchanges anything: the flag is read at every step."""

    def __post_init__(self) -> None:
        check_bool("save_on_preemption", self.save_on_preemption)
        check_signal_names("preemption_signals", self.preemption_signals)
        check_positive_int("preemption_sync_every", self.preemption_sync_every)

    @property
    def signal_numbers(self) -> tuple[int, ...]:
        """``preemption_signals`` as signal numbers, in order, without repeats."""
        import signal

        return tuple(dict.fromkeys(int(getattr(signal, name)) for name in self.preemption_signals))
