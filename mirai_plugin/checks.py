"""Input checks for the public entry points.

Every check names the argument, shows the value, says what was expected and how to
fix it, and raises ``MiraiError``. Types are strict where Python code passes values
(``True`` is not a number, ``"2e-6"`` is not a float); ``coerce=True`` reads values
the way YAML, OmegaConf and argparse users write them (``"off"`` -> ``False``,
``"2e-6"`` -> ``2e-06``, ``3.0`` -> ``3``) and refuses the rest.

>>> check("lr", "2e-6", Rule("number", above=0), coerce=True)
2e-06
>>> check("lr", "2e-6", Rule("number", above=0))
Traceback (most recent call last):
...
mirai_plugin.errors.MiraiError: lr must be a finite number > 0, got '2e-6'
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeGuard

from mirai_plugin.errors import MiraiError

TRUE_WORDS = ("true", "yes", "on", "y", "1")
FALSE_WORDS = ("false", "no", "off", "n", "0")


def show(value: Any, limit: int = 80) -> str:
    """A short printable form of ``value`` for messages (tensors by type and shape)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes, numbers.Number)):
        device = getattr(value, "device", None)
        where = f" on {device}" if device is not None else ""
        return f"{type(value).__name__} of shape {tuple(shape)}{where}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> TypeGuard[int]:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[float]:
    """A real number that is not a bool (ints and numpy numbers count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def did_you_mean(word: Any, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest known word, or ``""``."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def fail(name: str, expected: str, value: Any, fix: str = "") -> NoReturn:
    raise MiraiError(f"{name} must be {expected}, got {show(value)}" + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class Rule:
    """What one value may be.

    Args:
        kind: ``"int"``, ``"number"`` (finite), ``"bool"``, ``"choice"`` or ``"str"``.
        minimum / maximum: inclusive bounds; above / below: exclusive bounds.
        choices: the allowed strings of a ``"choice"``.
        none: ``None`` is allowed (and kept).
        what: the expected value in words, instead of the one built from the bounds.
        fix: appended to the message: how to fix it.
    """

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()
    none: bool = False
    what: str = ""
    fix: str = ""

    def expected(self) -> str:
        if self.what:
            text = self.what
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = f"one of {self.choices}"
        elif self.kind == "str":
            text = "a string"
        else:
            text = "an int" if self.kind == "int" else "a finite number"
            bounds = [
                f"{sign} {bound:g}"
                for sign, bound in ((">=", self.minimum), (">", self.above), ("<=", self.maximum), ("<", self.below))
                if bound is not None
            ]
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (" or None" if self.none else "")


def check(name: str, value: Any, rule: Rule, *, coerce: bool = False) -> Any:
    """``value`` checked against ``rule`` (normalised: ints to ``int``, numbers to ``float``).

    With ``coerce`` strings and integral floats are read first, as a YAML or
    command-line value would be meant.
    """
    if value is None:
        if rule.none:
            return None
        fail(name, rule.expected(), value, rule.fix)
    given = value
    if coerce:
        value = _coerce(value, rule.kind)
    if rule.kind == "bool":
        if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_ as well
            fail(name, rule.expected(), given, rule.fix)
        return bool(value)
    if rule.kind in ("choice", "str"):
        if not isinstance(value, str):
            fail(name, rule.expected(), given, rule.fix)
        if rule.kind == "choice" and value not in rule.choices:
            fix = did_you_mean(value, rule.choices).strip(" ()")
            fail(name, rule.expected(), value, "; ".join(part for part in (fix, rule.fix) if part))
        return value
    if rule.kind == "int":
        if not is_int(value):
            fail(name, rule.expected(), given, rule.fix)
        value = int(value)
    else:
        if not is_number(value) or not math.isfinite(value):
            fail(name, rule.expected(), given, rule.fix)
        value = float(value)
    if (
        (rule.minimum is not None and value < rule.minimum)
        or (rule.maximum is not None and value > rule.maximum)
        or (rule.above is not None and value <= rule.above)
        or (rule.below is not None and value >= rule.below)
    ):
        fail(name, rule.expected(), given, rule.fix)
    return value


def _coerce(value: Any, kind: str) -> Any:
    """Read a YAML / command-line value as ``kind``; returns it unchanged when it cannot be read."""
    if kind == "bool":
        if isinstance(value, str):
            word = value.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
        elif is_int(value) and value in (0, 1):
            return bool(value)
        return value
    if kind == "int":
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                return value
        if is_number(value) and not is_int(value) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        return value
    if kind == "number" and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def parse_device(name: str, value: Any, *, none: bool = False) -> str | None:
    """The canonical string of a ``torch.device``-style value (``"cuda:1"``, ``torch.device("cpu")``).

    Only the syntax is checked here: configs are built on machines (and meta devices)
    other than the ones they run on; ``check_device_available`` checks at first use.
    """
    import torch

    if value is None and none:
        return None
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        try:
            device = torch.device(value.strip())
        except (RuntimeError, ValueError):
            fail(name, "a device such as 'cpu', 'cuda' or 'cuda:1'" + (" or None" if none else ""), value,
                 "use torch.device syntax")
    else:
        fail(name, "a device string such as 'cpu' or 'cuda:1'" + (" or None" if none else ""), value)
    if device.type == "meta":
        fail(name, "a device that holds values (not 'meta')", value, "use 'cpu' or an accelerator")
    return str(device)


def check_device_available(name: str, device: Any) -> None:
    """Raise when ``device`` does not exist on this machine (no CUDA, or an index past the last GPU)."""
    import torch

    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise MiraiError(
            f"{name}={str(device)!r}, but no {device.type} device is available on this machine; use 'cpu' "
            f"(or run where a {device.type} device is)"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise MiraiError(
            f"{name}={str(device)!r}, but this machine has {count()} {device.type} device(s) "
            f"(indices 0..{count() - 1}); pick one of those"
        )


def check_tensor(name: str, value: Any, *, dims: int | None = None, layout: str = "") -> Any:
    """A tensor with real values (not on the meta device), with ``dims`` dimensions when given."""
    import torch

    described = f"a tensor {layout}".rstrip() if layout else "a tensor"
    if not isinstance(value, torch.Tensor):
        raise MiraiError(f"{name} must be {described}, got {'None' if value is None else type(value).__name__}")
    if value.device.type == "meta":
        raise MiraiError(
            f"{name} is on the meta device (a shape without values), got {show(value)}; the foresight term "
            f"needs real tensors: materialise the model first (module.to_empty(device=...), then load its weights)"
        )
    if dims is not None and value.dim() != dims:
        raise MiraiError(f"{name} must be {described} ({dims} dims), got shape {tuple(value.shape)}")
    return value


def check_finite_values(name: str, values: Any, *, dims: str = "index", fix: str = "") -> None:
    """Raise naming how many entries of ``values`` are NaN or inf and where the first is (``dims``
    names its coordinates). Syncs the device: for inputs checked once, not per training step."""
    import torch

    if not values.is_floating_point():
        return
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise MiraiError(
            f"{name} hold {int(bad.sum())} NaN or inf value(s), the first at {dims} {first} of shape "
            f"{tuple(values.shape)}" + (f"; {fix}" if fix else "")
        )


def normalise_betas(betas: Any, *, name: str = "betas") -> tuple[float, float]:
    expected = "two numbers in [0, 1) such as (0.0, 0.999)"
    if isinstance(betas, (str, bytes, Mapping)) or not isinstance(betas, Iterable):
        fail(name, expected, betas)
    values = tuple(betas)
    if len(values) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in values):
        fail(name, expected, betas)
    return float(values[0]), float(values[1])


def normalise_offsets(offsets: Any) -> tuple[int, ...]:
    expected = "a non-empty sequence of distinct ints >= 0 such as (0, 1) (0 = current segment, 1 = next)"
    if isinstance(offsets, (str, bytes, Mapping)) or not isinstance(offsets, Iterable):
        fail("offsets", expected, offsets)
    values = tuple(offsets)
    if not values:
        raise MiraiError("offsets is empty: give at least one segment offset, e.g. offsets=(0, 1)")
    if not all(is_int(v) and v >= 0 for v in values):
        fail("offsets", expected, offsets)
    if len(set(values)) != len(values):
        fail("offsets", expected, offsets, "offsets has duplicates; give each offset once")
    return tuple(sorted(int(v) for v in values))
