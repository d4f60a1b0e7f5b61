"""Natural sorting of checkpoint names, the ``step_<N>`` folder naming scheme, and name templates.

Checkpoint names carry numbers (``step_10``, ``epoch=2-step=100.ckpt``, ``ckpt_1e5``), and a plain
string sort puts ``step_10`` before ``step_9``. :func:`natural_key` compares the numbers in a name
as numbers, so listings read in training order. The step folder helpers are a strict pair:
``parse_step_dir(step_dir_name(n)) == n`` for every ``n >= 0``, and every other name parses to
``None``, so one step can never be stored under two folder names.

A :class:`NameTemplate` (``IOOptions.name_template``) names checkpoints from fields instead
(``"epoch={epoch}-step={step}{version}.ckpt"``, Lightning's ``ModelCheckpoint`` names): it formats
a name from the step and the save's metrics, and recognises the names it can produce, recovering
the step from the name when the template has a ``{step}`` field (else the manifest holds it).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

__all__ = [
    "STEP_PREFIX",
    "VERSION_PREFIX",
    "NameTemplate",
    "natural_key",
    "natural_sorted",
    "parse_step_dir",
    "step_dir_name",
]

STEP_PREFIX = "step_"
"""Prefix of a committed step folder: step 42 lives in ``step_42``."""

# A number run: an optional minus sign (only where no letter or digit comes right before it), then
# digits, an optional fraction and an optional exponent. ASCII digits only, so a name never turns
# into a number through a lookalike character.
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_STEP_NUMBER = re.compile(r"0|[1-9][0-9]*", re.ASCII)

# Tags make every key element comparable with every other (a number never meets a string in a
# comparison, so sorting mixed names cannot raise TypeError). Numbers sort before text.
_NUM_TAG = 0
_TEXT_TAG = 1
_KeyPart = tuple[int, Decimal | str]  # (_NUM_TAG, number) or (_TEXT_TAG, text)


def natural_key(name: str) -> tuple[tuple[_KeyPart, ...], str]:
    """Return a sort key that compares the number runs in ``name`` numerically.

    The name is split into text runs and number runs; the key is a tuple of tagged parts, each
    ``(0, number)`` or ``(1, text)``, followed by ``name`` itself as a final tie-break (so
    ``step_01`` and ``step_1`` still have a fixed order). Numbers sort before text at the same
    position. Text compares exactly (case-sensitive).

    A number run is ``[-]digits[.digits][e[+-]digits]``, read exactly (as a ``Decimal``, never
    rounded through a float):

    * ``-`` is a minus sign only when it is directly followed by a digit and **not** preceded by
      an ASCII letter or digit. In ``ckpt_-1.0`` and ``loss=-0.5`` it follows ``_``/``=`` and is
      a sign; in ``epoch=2-step=100`` it follows ``2`` and is a separator.
    * ``.`` starts a fraction only when a digit follows (``step_1.ckpt`` is 1 then ``.ckpt``), so
      ``v1.10`` reads as the decimal 1.10, which sorts before ``v1.9``.
    * ``e``/``E`` starts an exponent only when digits follow (``ckpt_1e5`` is 100000).

    Args:
        name: any string.

    Returns:
        A tuple usable as ``key=`` in ``sorted``; keys of any two strings compare without error.

    Example:
        >>> sorted(["step_10", "step_9", "ckpt_-1.0"], key=natural_key)
        ['ckpt_-1.0', 'step_9', 'step_10']
        >>> natural_key("epoch=2-step=100") < natural_key("epoch=10-step=5")
        True
    """
    parts: list[_KeyPart] = []
    pos = 0
    for match in _NUMBER.finditer(name):
        if match.start() > pos:
            parts.append((_TEXT_TAG, name[pos : match.start()]))
        parts.append((_NUM_TAG, Decimal(match.group())))
        pos = match.end()
    if pos < len(name):
        parts.append((_TEXT_TAG, name[pos:]))
    return (tuple(parts), name)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Return ``names`` as a new list in natural order (see :func:`natural_key`).

    Example:
        >>> natural_sorted(["ckpt_200000", "ckpt_1e5", "ckpt_0", "ckpt_-1.0"])
        ['ckpt_-1.0', 'ckpt_0', 'ckpt_1e5', 'ckpt_200000']
    """
    return sorted(names, key=natural_key)


def step_dir_name(step: int, prefix: str = STEP_PREFIX) -> str:
    """Return the folder name of a committed step: ``step_<step>``, no zero padding.

    Args:
        step: a non-negative int (not a bool).
        prefix: the folder name prefix (``checkpoint-`` gives the HF Trainer's layout).

    Returns:
        ``prefix + str(step)``.

    Raises:
        TypeError: ``step`` is not an int, or is a bool.
        ValueError: ``step`` is negative.

    Example:
        >>> step_dir_name(42)
        'step_42'
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be a non-negative int, got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"step must be a non-negative int, got {step}; steps count up from 0")
    return f"{prefix}{step}"


def parse_step_dir(name: str, prefix: str = STEP_PREFIX) -> int | None:
    """Return the step of a folder named exactly ``step_<N>``, else ``None``.

    Only the form :func:`step_dir_name` writes is accepted: ASCII digits, no sign, no leading
    zeros (``step_007`` is ``None``; it would otherwise alias ``step_7``), no suffix
    (``step_7.tmp`` is ``None``, which is how in-progress folders stay invisible). Hidden names
    (starting with ``.``) never match.

    Example:
        >>> parse_step_dir("step_12"), parse_step_dir("step_012"), parse_step_dir(".step_12")
        (12, None, None)
    """
    if not name.startswith(prefix) or name.startswith("."):
        return None
    match = _STEP_NUMBER.fullmatch(name[len(prefix) :])
    return int(match.group(0)) if match else None


VERSION_PREFIX = "-v"
"""What a template's ``{version}`` field becomes for version N >= 1 (``-v1``); empty for version 0."""


class _WholeNames(string.Formatter):
    """A field name is one key (``{val.acc}`` is the metric ``val.acc``, not an attribute)."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        return kwargs[field_name], field_name


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./\\-]*")


class NameTemplate:
    """Checkpoint names made from a template in ``str.format`` syntax, and recognised again.

    Fields are the save's metrics and ``step`` (``{step}``, ``{val_loss:.2f}``); ``{version}`` is
    the optional ``-vN`` a save adds when its name is already taken (empty for the first). A name
    *matches* when the template could have produced it: literal text as written, ``{step}`` a
    run of ASCII digits (the step, recovered from the name), ``{version}`` empty or ``-v<N>``,
    any other field any text without ``/``. Hidden names never match.

    Args:
        template: for example ``"epoch={epoch}-step={step}{version}.ckpt"``.

    Raises:
        ValueError: the template is not valid ``str.format`` syntax, has a positional or
            attribute/index field, contains ``/``, or starts with ``.``.

    Example:
        >>> t = NameTemplate("epoch={epoch}-step={step}{version}.ckpt")
        >>> t.format(12, {"epoch": 1}), t.format(12, {"epoch": 1}, version=2)
        ('epoch=1-step=12.ckpt', 'epoch=1-step=12-v2.ckpt')
        >>> t.match("epoch=1-step=12-v2.ckpt"), t.match("last.ckpt")
        ((True, 12), (False, None))
    """

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template or template.startswith(".") or "/" in template:
            raise ValueError(f"a name template must be a non-empty name without '/', not hidden; got {template!r}")
        pattern, fields, step_seen = [], [], False
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"name template {template!r} is not valid str.format syntax: {exc}") from None
        for literal, name, spec, _conversion in parsed:
            pattern.append(re.escape(literal))
            if name is None:
                continue
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(
                    f"name template {template!r}: field {{{name}}} must be a plain name ({{step}}, {{epoch}}, "
                    "{val_loss:.2f}); positional fields are not supported"
                )
            if "{" in (spec or ""):
                raise ValueError(f"name template {template!r}: nested fields in a format spec are not supported")
            fields.append(name)
            if name == "step" and not step_seen:
                pattern.append(r"(?P<step>[0-9]+)")
                step_seen = True
            elif name == "version":
                pattern.append("(?:" + re.escape(VERSION_PREFIX) + r"[0-9]+)?")
            else:
                pattern.append(r"[^/]+?")
        self.template = template
        self.fields = tuple(fields)
        self.has_step = step_seen
        self._regex = re.compile("".join(pattern), re.DOTALL)

    def format(self, step: int, fields: Mapping[str, Any], version: int = 0) -> str:
        """The name for a save of ``step`` with ``fields`` (its metrics); a missing field is 0,
        as in Lightning's names, and a whole-number float is formatted as an int."""
        values: dict[str, Any] = {name: 0 for name in self.fields}
        for key, value in fields.items():  # 3.0 as 3: metrics arrive as floats, {epoch:02d} needs an int
            values[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        values["step"] = step
        values["version"] = f"{VERSION_PREFIX}{version}" if version else ""
        return _WholeNames().vformat(self.template, (), values)

    def match(self, name: str) -> tuple[bool, int | None]:
        """``(matches, step)``: whether ``name`` is one of this template's names, and the step
        its ``{step}`` field holds (None without one: read it from the manifest)."""
        if name.startswith("."):
            return False, None
        found = self._regex.fullmatch(name)
        if found is None:
            return False, None
        return True, (int(found.group("step")) if self.has_step else None)

    def __repr__(self) -> str:
        return f"NameTemplate({self.template!r})"
