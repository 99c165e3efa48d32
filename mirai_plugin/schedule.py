"""The term's weight over training: one schedule type, the base of both term configs.

``WeightSchedule`` holds the weight and when it applies (start, linear ramp, step
changes, stop) and the members every frozen config shares: ``enabled``,
``weight_at``, ``replace``, ``to_dict``, ``to_json`` / ``from_json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mirai_plugin.checks import Rule, check, did_you_mean, fail, is_int, is_number, show
from mirai_plugin.errors import MiraiError

STEP = "an int >= 0 (generator steps)"
_Self = TypeVar("_Self", bound="WeightSchedule")


@dataclass(frozen=True, kw_only=True)
class WeightSchedule:
    """The weight at each step: ``weight`` from ``weight_start``, reached linearly over
    ``weight_ramp`` steps, replaced at each ``(step, weight)`` of ``weight_changes``, and 0
    from ``weight_stop`` on.

    Example:
        >>> schedule = WeightSchedule(weight=2.0, weight_changes=((500, 1.0),), weight_start=10, weight_ramp=4)
        >>> [schedule.weight_at(s) for s in (0, 9, 10, 11, 13, 499, 500)]
        [0.0, 0.0, 0.5, 1.0, 2.0, 2.0, 1.0]
    """

    weight: float = 0.0
    weight_start: int = 0
    weight_ramp: int = 0
    weight_changes: tuple[tuple[int, float], ...] = ()
    weight_stop: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # (frozen)
        set_("weight", check("weight", self.weight, Rule("number", minimum=0, fix="use 0 to disable the term")))
        for name in ("weight_start", "weight_ramp"):
            set_(name, check(name, getattr(self, name), Rule("int", minimum=0, what=STEP)))
        set_("weight_changes", normalise_changes(self.weight_changes))
        stop = self.weight_stop
        if stop is not None and not (is_int(stop) and stop > self.weight_start):
            fail("weight_stop", f"None or a step after weight_start={self.weight_start}", stop)
        set_("weight_stop", None if stop is None else int(stop))

    @property
    def enabled(self) -> bool:
        """True when the term has a weight > 0 at some step."""
        return self.weight > 0 or any(w > 0 for _, w in self.weight_changes)

    def weight_at(self, step: int) -> float:
        """The weight at step ``step`` (0-based count of head steps taken)."""
        step = check("step", step, Rule("int", minimum=0, what="a generator step (an int >= 0)"))
        if step < self.weight_start or (self.weight_stop is not None and step >= self.weight_stop):
            return 0.0
        weight = float(self.weight)
        for change_step, value in self.weight_changes:
            if step >= change_step:
                weight = value
        if self.weight_ramp:
            weight *= min(1.0, (step - self.weight_start + 1) / self.weight_ramp)
        return weight

    def replace(self: _Self, **changes: Any) -> _Self:
        """A copy with some fields changed (validated again)."""
        check_field_names(type(self), changes, "replace")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples as lists); ``type(self)(**d)`` rebuilds it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[_Self], text: str) -> _Self:
        """Rebuild the config ``to_json`` wrote."""
        return cls(**fields_from_json(cls, text))


def normalise_changes(changes: Any, *, name: str = "weight_changes") -> tuple[tuple[int, float], ...]:
    expected = "((step, weight), ...) with increasing steps >= 0 and finite weights >= 0"
    if isinstance(changes, (str, bytes, Mapping)):
        fail(name, expected, changes)
    try:
        pairs = tuple((step, weight) for step, weight in changes)
    except (TypeError, ValueError):
        fail(name, expected, changes)
    for step, weight in pairs:
        if not (is_int(step) and step >= 0 and is_number(weight) and weight >= 0 and weight < float("inf")):
            fail(name, expected, changes)
    if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:])):
        fail(name, expected, changes, "sort the steps and give each step once")
    return tuple((int(step), float(weight)) for step, weight in pairs)


def check_field_names(cls: type, names: Iterable[str], where: str) -> None:
    """Refuse names that are not fields of the dataclass ``cls``, with the closest field."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise MiraiError(
            f"{cls.__name__}.{where}: unknown field(s) "
            + ", ".join(f"{name!r}{did_you_mean(name, fields)}" for name in unknown)
            + f"; the fields are {fields}"
        )


def fields_from_json(cls: type, text: Any) -> dict[str, Any]:
    """The fields a ``to_json`` wrote, checked: JSON text of an object whose keys are fields of ``cls``."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise MiraiError(
            f"{cls.__name__}.from_json needs the JSON text that to_json() writes, got {show(text)} ({error})"
        ) from None
    if not isinstance(data, dict):
        raise MiraiError(f"{cls.__name__}.from_json needs a JSON object of fields, got {type(data).__name__}")
    check_field_names(cls, data, "from_json")
    return data
