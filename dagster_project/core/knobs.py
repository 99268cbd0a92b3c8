"""Release knobs (`--set KEY=VALUE`): one typed schema for the CLI, the build asset and the
registry, plus the quoting every message about user input uses.

Values arrive as text from the command line or run config, or as numbers from a manifest.
They are parsed by the knob's own type, never as YAML, so `[0-9]+$` is a regex and `[` is a
bad number, not a parser crash. The canonical form (floats for numbers, str for regexes) is
what goes into the artifact manifest, so `0.5` and `"0.5"` give the same artifact.

Plain Python: no dagster import (the core never imports it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

SettingValue = str | int | float

QUOTE_LIMIT = 80
MAX_NUMBER_TEXT = 32  # longer "numbers" are refused before float() sees them
MAX_REGEX_LENGTH = 256
MAX_REGEX_NESTING = 10  # "(((((...)))))": deep nesting is refused before re.compile
# ASCII digits only, matched whole (`$` alone would let a trailing newline through).
NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


class KnobError(ValueError):
    """A bad release knob; the message names the key, what was expected and the input."""


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr` of user input cut to `limit` characters, with the original length when cut, so
    a 10,000-character value never floods a terminal or a log."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


@dataclass(frozen=True)
class Knob:
    name: str
    kind: Literal["number", "regex"]
    help: str
    minimum: float = 0.0
    maximum: float = 0.0

    @property
    def expected(self) -> str:
        if self.kind == "number":
            return f"a number within [{self.minimum:g}, {self.maximum:g}]"
        return f"a Python regex of 1-{MAX_REGEX_LENGTH} characters"

    def parse(self, value: object) -> SettingValue:
        """The canonical value, or KnobError naming the key and quoting the input."""
        if self.kind == "number":
            return self._number(value)
        return self._regex(value)

    def _refuse(self, value: object, why: str) -> KnobError:
        return KnobError(
            f"--set '{self.name}': {why}, got {quote(value)}; expected {self.expected} "
            f"({self.help})"
        )

    def _number(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self._refuse(value, "not a number")
        if isinstance(value, str):
            text = value.strip()
            if len(text) > MAX_NUMBER_TEXT:
                raise self._refuse(value, f"longer than {MAX_NUMBER_TEXT} characters")
            if not NUMBER_RE.fullmatch(text):
                raise self._refuse(value, "not a number")
            number = float(text)
        else:
            number = float(value)
        if not math.isfinite(number):
            raise self._refuse(value, "not a finite number")
        if not self.minimum <= number <= self.maximum:
            raise self._refuse(value, "out of range")
        return number

    def _regex(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise self._refuse(value, "empty or not text")
        if len(value) > MAX_REGEX_LENGTH:
            raise self._refuse(value, f"longer than {MAX_REGEX_LENGTH} characters")
        if nesting_depth(value) > MAX_REGEX_NESTING:
            raise self._refuse(value, f"groups nested deeper than {MAX_REGEX_NESTING}")
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise self._refuse(value, f"not a valid regex ({exc})") from None
        return value


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        Knob("error_rate", "number", "share of API answers turned into 500s", 0.0, 1.0),
        Knob("extra_latency_ms", "number", "delay added to every API data request", 0.0, 60_000.0),
        Knob("fail_jobs_matching", "regex", "the worker fails jobs whose key matches"),
        Knob("job_latency_ms", "number", "time the worker spends on every job", 0.0, 60_000.0),
        Knob(
            "dynamic_max_age",
            "number",
            "max-age (seconds) the API declares on its dynamic endpoints instead of the class TTL",
            1.0,
            31_536_000.0,
        ),
        Knob(
            "guardrails_off",
            "number",
            "1 switches off the API's own rate limit and circuit breaker (0: on)",
            0.0,
            1.0,
        ),
    )
}
SETTING_KEYS: tuple[str, ...] = tuple(KNOBS)


def nesting_depth(pattern: str) -> int:
    """Deepest parenthesis nesting, ignoring escaped parentheses and character classes."""
    depth = deepest = 0
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(depth - 1, 0)
    return deepest


def knob(key: object) -> Knob:
    if isinstance(key, str) and key in KNOBS:
        return KNOBS[key]
    raise KnobError(f"--set: unknown key {quote(key)}; known keys: {', '.join(SETTING_KEYS)}")


def validate(settings: Mapping[str, object] | None) -> dict[str, SettingValue]:
    """Every knob checked and canonical, in the schema's order; KnobError on the first bad one."""
    settings = dict(settings or {})
    for key in settings:
        knob(key)
    return {key: KNOBS[key].parse(settings[key]) for key in SETTING_KEYS if key in settings}


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from the command line -> {key: value as text}; KnobError on a
    malformed pair, an unknown key or a key given twice."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KnobError(
                f"--set {quote(pair)}: expected KEY=VALUE with KEY one of {', '.join(SETTING_KEYS)}"
            )
        knob(key)
        if key in settings:
            raise KnobError(f"--set '{key}': given twice; give each key once")
        settings[key] = value.strip()
    return settings
