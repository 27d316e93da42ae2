"""Rules for config values (type, length, range), checked before any data is read.

Each key of a config has one `Rule`; `check_values` walks a config against its table of rules and raises one
error naming the first bad key, what it must be and what it got, so that a value that would otherwise fail deep
inside TensorFlow or JAX, or train on silently as NaN, stops the run at once. A key without a rule is an unknown
key (a typo in a config file, which would otherwise be ignored): it is reported with the closest known key. The tables live beside the configs
they check: `qkv_vit.data.config` (config.data) and `qkv_vit.train.config` (the rest).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

from qkv_vit.errors import ConfigError

RuleTable = Mapping[str, "Rule | RuleTable | None"]  # None: the key is checked elsewhere (e.g. config.data)
FLOAT32_MAX = 3.4028234663852886e38  # values are used as float32: a larger one becomes inf there


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one key's value must be: `accepts(value)` decides, `requirement` says it in words."""

    requirement: str  # completes "config.<key> must be ...", e.g. "an integer >= 1"
    accepts: Callable[[Any], bool]
    optional: bool = False  # None allowed (the key's default is "unset")
    hint: str = ""  # one more sentence, e.g. how to write a tuple on the command line

    def check(self, name: str, value: Any, error: type[ConfigError]) -> None:
        if value is None and self.optional:
            return
        if not self.accepts(value):
            requirement = self.requirement + (" (or None to leave it unset)" if self.optional else "")
            raise error(
                f"{name} must be {requirement}, got {value!r}: change it to a value that is."
                f"{' ' + self.hint if self.hint else ''}"
            )


def is_number(value: Any) -> bool:
    """An int or float finite in float32, where it is used (not a bool, which Python counts as an int)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= FLOAT32_MAX
    )


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def shown(bound: float) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{shown(low)}, {shown(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {shown(low)}"
    return f"{'<' if high_open else '<='} {shown(high)}" if high is not None else ""


def integer(
    minimum: int | None = None, maximum: int | None = None, *, or_minus_one: bool = False, optional: bool = False
) -> Rule:
    """An int in [minimum, maximum]; `or_minus_one`: -1 too (meaning "all" or "automatic")."""
    bounds = describe_range(minimum, maximum, False, False)
    words = "an integer" + (f" {bounds}" if bounds else "") + (" or -1" if or_minus_one else "")

    def accepts(value: Any) -> bool:
        return is_integer(value) and (
            (in_range(value, minimum, maximum, False, False)) or (or_minus_one and value == -1)
        )

    return Rule(words, accepts, optional)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> Rule:
    """A finite number in the interval (bounds included unless open)."""
    words = f"a finite number {describe_range(low, high, low_open, high_open)}".rstrip()
    return Rule(words, lambda v: is_number(v) and in_range(v, low, high, low_open, high_open), optional)


def probability() -> Rule:
    return number(0.0, 1.0)


def flag(optional: bool = False) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), optional)


def of_type(kind: type, optional: bool = False) -> Rule:
    """Only the type (ranges checked by whoever uses the value, e.g. the model's own validation)."""
    return {
        bool: flag,
        int: lambda optional: integer(optional=optional),
        float: lambda optional: number(optional=optional),
        str: lambda optional: text(optional=optional),
    }[kind](optional)


def text(
    choices: tuple[str, ...] | None = None,
    *,
    nonempty: bool = False,
    forbidden: str = "",
    reserved: tuple[str, ...] = (),
    optional: bool = False,
) -> Rule:
    """A string: one of `choices`, or any (non-empty) string without the `forbidden` characters that neither is
    nor starts with a `reserved` name."""
    if choices is not None:
        return Rule(f"one of {list(choices)}", lambda v: v in choices, optional)
    words = "a non-empty string" if nonempty else "a string"
    words += f" without {' '.join(forbidden)}" if forbidden else ""
    words += f" that does not start with {' or '.join(map(repr, reserved))}" if reserved else ""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, str)
            and bool(value or not nonempty)
            and not set(value) & set(forbidden)
            and not value.startswith(reserved)
        )

    return Rule(words, accepts, optional)


def numbers(
    count: int,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    ordered: bool = False,
    what: str = "",
    hint: str = "",
) -> Rule:
    """A tuple (or list) of `count` finite numbers, each in the interval, non-decreasing if `ordered`."""
    words = f"{count} numbers {what or ''}".rstrip()
    words += f" each {describe_range(low, high, low_open, high_open)}" if low is not None or high is not None else ""
    words += ", the first <= the second" if ordered else ""

    def accepts(value: Any) -> bool:
        if not isinstance(value, (tuple, list)) or len(value) != count or not all(is_number(v) for v in value):
            return False
        return all(in_range(v, low, high, low_open, high_open) for v in value) and (
            not ordered or list(value) == sorted(value)
        )

    return Rule(words, accepts, hint=hint)


# What other trainers call a key of ours (timm's, PyTorch's), for "did you mean" when the name is far from ours.
SYNONYMS = {
    "learning_rate": "lr",
    "batch_size": "global_batch_size",
    "epochs": "total_epochs",
    "steps": "total_steps",
    "warmup_lr": "warmup_init_lr",
    "clip_grad": "grad_clip_norm",
    "model": "model_name",
}


def closest_key(key: str, known: list[str]) -> str | None:
    """The known dotted key `key` most likely means: a sibling whose last part is close to (or the synonym of)
    key's last part, else the closest whole key; None when nothing is close."""
    group, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group}
    leaf = SYNONYMS.get(leaf, leaf) if SYNONYMS.get(leaf) in siblings else leaf
    match = difflib.get_close_matches(leaf, list(siblings), n=1) or difflib.get_close_matches(key, known, n=1)
    return siblings[match[0]] if match and match[0] in siblings else (match[0] if match else None)


def check_values(
    config: Mapping[str, Any],
    rules: RuleTable,
    prefix: str = "config.",
    error: type[ConfigError] = ConfigError,
) -> None:
    """Every key of `config` against its rule (nested tables for nested configs); `error` names the first bad one,
    or the first key of the table the config lacks (a group replaced whole by a config file)."""
    missing = [key for key in rules if key not in config.keys()]
    if missing:
        raise error(
            f"{prefix}{missing[0]} is missing: a config file replaced its group without it. Start from the defaults "
            "(base_config(), data.get_config()) and change the keys you need instead of replacing a whole group."
        )
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in rules:
            close = closest_key(key, list(rules))
            raise error(
                f"{name} is not a known key{f' (did you mean {prefix}{close}?)' if close else ''}: "
                f"a config file set a key that nothing reads. Correct its name or remove it; known keys here: "
                f"{', '.join(rules)}."
            )
        rule = rules[key]
        if isinstance(rule, Rule):
            rule.check(name, config[key], error)
        elif rule is not None:
            if not hasattr(config[key], "keys"):  # a ConfigDict (or dict) of its own keys
                raise error(
                    f"{name} must be a group of keys ({', '.join(rule)}), got {config[key]!r}: set its keys one by "
                    f"one ({name}.KEY = VALUE) instead of replacing the group."
                )
            check_values(config[key], rule, f"{name}.", error)
