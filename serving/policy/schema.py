"""The policy file: rules, fusion settings, graduated responses and allow-lists as data.

A policy is YAML validated strictly (unknown keys are refused, every rule type checks its
own params) so that a typo is an error with a line number, never a rule that silently
never fires. `keywatch policy check FILE` runs exactly the loader the service uses.

Running services pick up a changed file without a restart (`PolicySource`): the file's
mtime is checked at most once a second, and a broken new version is refused with a
logged error while the previous policy stays in force — a bad edit must not disarm
detection nor take the service down.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from features.pricing import PricingConfig
from serving.policy.rules import AnyRule, BudgetRule, RuleBase

log = logging.getLogger("keywatch.policy")

DEFAULT_POLICY = "default_policy.yaml"
PERMANENT_S = float("inf")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_UNIT_S = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """`90`, `"30m"`, `"2h"`, `"7d"` or `"permanent"` as seconds (permanent = inf)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '30m', '2h', '7d'")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("a duration must be positive")
        return float(value)
    if isinstance(value, str):
        if value.strip().lower() in ("permanent", "forever"):
            return PERMANENT_S
        m = _DURATION.match(value.lower())
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) * _UNIT_S[m.group(2)]
    raise ValueError(f"{value!r} is not a duration: use seconds or text like '30m', '2h', "
                     "'7d', or 'permanent'")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierResponse(_Strict):
    """What to do at one severity tier."""

    action: Literal["none", "log", "alert", "throttle", "ban", "perm_ban"]
    limit_per_min: int | None = Field(default=None, ge=1)
    """For throttle: the reduced rate the gateway should allow."""
    retry_after_s: int = Field(default=60, ge=1)
    duration: float = 900.0
    """For throttle: how long the limit holds once set (renewed while the throttle goes on)."""
    burst: int | None = Field(default=None, ge=1)
    """For throttle: calls allowed back to back; default ten seconds' worth of the limit."""

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds == PERMANENT_S:
            raise ValueError("a throttle's duration must be finite")
        return seconds


class BanSettings(_Strict):
    ladder: tuple[float, ...] = Field(default=(1800, 7200, 86400, PERMANENT_S), min_length=1)
    """Ban lengths for the 1st, 2nd, 3rd... offence; the last repeats."""
    decay_after: float = 7 * 86400
    """Each clean period this long since the last ban forgives one step of the ladder."""

    @field_validator("ladder", mode="before")
    @classmethod
    def _ladder(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError("ladder is a list of durations, e.g. [30m, 2h, 24h, permanent]")
        return tuple(parse_duration(v) for v in value)

    @field_validator("decay_after", mode="before")
    @classmethod
    def _decay(cls, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds == PERMANENT_S:
            raise ValueError("decay_after must be finite")
        return seconds


def _default_tiers() -> dict[str, TierResponse]:
    return {
        "low": TierResponse(action="log"),
        "medium": TierResponse(action="alert"),
        "high": TierResponse(action="throttle", limit_per_min=60, retry_after_s=60),
        "critical": TierResponse(action="ban"),
    }


class ResponsesConfig(_Strict):
    tiers: dict[Literal["low", "medium", "high", "critical"], TierResponse] = Field(
        default_factory=_default_tiers)
    bans: BanSettings = Field(default_factory=BanSettings)


class FusionConfig(_Strict):
    """How calibrated model scores raise the floor the rules set (see serving.policy.fusion)."""

    model_corroborate: float = Field(default=0.99, gt=0.5, lt=1.0)
    """A model at or above this percentile counts as one signal."""
    model_alert: float = Field(default=0.999, gt=0.5, lt=1.0)
    """The offline percentile at which a model alone raises the tier to medium."""
    models_alone_max: Literal["low", "medium", "high"] = "medium"
    """The highest tier model scores reach without a rule. Per-event percentiles fire on
    every busy key some time each day, so by default models alone alert (medium) and reach
    high or above only when a rule corroborates them."""
    population_surge: float = Field(default=2.0, gt=1.0)
    """Population traffic at this multiple of its hour-of-week norm is a shared surge."""
    key_vs_population: float = Field(default=3.0, gt=1.0)
    """A key within this multiple of the population's own surge is riding it, not
    attacking: model scores on it are not escalated."""


class AllowList(_Strict):
    keys: tuple[str, ...] = ()
    """Key ids (k_…) or raw keys; raw keys are hashed when the policy is loaded."""
    cidrs: tuple[str, ...] = ()

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for cidr in value:
            try:
                out.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR range") from None
        return tuple(out)


class Policy(_Strict):
    version: Literal[1] = 1
    description: str | None = None
    dry_run: bool = False
    """Whole-policy shadow mode: everything is scored and alerted, nothing enforced."""
    rules: tuple[AnyRule, ...]
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    allow_list: AllowList = Field(default_factory=AllowList)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    """Model prices (USD per million tokens) over the packaged defaults."""

    def active_rules(self) -> tuple[RuleBase, ...]:
        return tuple(r for r in self.rules if r.mode != "off")

    def budget_rules(self) -> tuple[BudgetRule, ...]:
        return tuple(r for r in self.rules if isinstance(r, BudgetRule) and r.mode != "off")

    def summary(self) -> str:
        modes = {m: sum(1 for r in self.rules if r.mode == m) for m in ("active", "monitor",
                                                                        "off")}
        types: dict[str, int] = {}
        for r in self.rules:
            types[r.type] = types.get(r.type, 0) + 1
        tiers = ", ".join(f"{t}→{r.action}" for t, r in self.responses.tiers.items())
        ladder = " → ".join(_fmt_duration(d) for d in self.responses.bans.ladder)
        return (f"{len(self.rules)} rules ({modes['active']} active, {modes['monitor']} "
                f"monitor, {modes['off']} off); types: "
                f"{', '.join(f'{k} {v}' for k, v in sorted(types.items()))}; responses: "
                f"{tiers}; bans: {ladder}; allow-list: {len(self.allow_list.keys)} keys, "
                f"{len(self.allow_list.cidrs)} ranges" + ("; DRY RUN" if self.dry_run else ""))


def _fmt_duration(seconds: float) -> str:
    if seconds == PERMANENT_S:
        return "permanent"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


_RULE: TypeAdapter[RuleBase] = TypeAdapter(AnyRule)


# ---- loading, with line numbers ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ValueError):
    """The policy file is unusable; `problems` say what is wrong and on which line."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))

    def report(self) -> str:
        return "\n".join(f"{self.source}:{p.line or 0}: {p.path + ': ' if p.path else ''}"
                         f"{p.message}" for p in self.problems)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Walk the composed YAML node tree along a pydantic error location.

    Discriminated unions add the tag (`'rate_limit'`) to the location; a part that is not
    a key of the current mapping is skipped, so the walk ends on the deepest node that
    exists (for a missing field: the mapping that lacks it)."""
    node = root
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                continue
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
        else:
            break
    return line


def _path(loc: tuple[Any, ...], data: Any) -> str:
    """A readable path: `rules[3] (credential_stuffing).params.limit`."""
    out: list[str] = []
    cur = data
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(cur, list) and 0 <= part < len(cur):
                cur = cur[part]
                if isinstance(cur, dict) and isinstance(cur.get("id"), str):
                    label += f" ({cur['id']})"
            out.append(label)
        else:
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            elif isinstance(cur, dict) and part in ("rate_limit", "threshold",
                                                    "distinct_count", "travel_speed",
                                                    "model_score", "banned", "budget"):
                continue  # the discriminator tag pydantic inserts
            else:
                cur = None
            out.append(("." if out else "") + str(part))
    return "".join(out)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate policy text; raise PolicyError naming every problem and its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [Problem(mark.line + 1 if mark else None, "",
                                           f"not valid YAML: {problem}")]) from None
    if not isinstance(data, dict):
        raise PolicyError(source, [Problem(1, "", "a policy is a mapping with at least "
                                                  "'rules'")])
    problems: list[Problem] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}"
            problems.append(Problem(_line_of(root, loc), _path(loc, data), msg))
    # checks across fields, on every rule that is valid on its own (so one run of
    # `policy check` reports everything it can, not one layer of errors at a time)
    raw_rules = data.get("rules") if isinstance(data.get("rules"), list) else []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        rid = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(rid, str):
            if rid in seen:
                loc = ("rules", i, "id")
                problems.append(Problem(_line_of(root, loc), _path(loc, data),
                                        f"duplicate rule id {rid!r} (first at "
                                        f"rules[{seen[rid]}])"))
            seen.setdefault(rid, i)
        try:
            rule = _RULE.validate_python(raw)
        except ValidationError:
            continue  # already reported above
        for sub, msg in rule.problems():
            loc = ("rules", i, *sub)
            problems.append(Problem(_line_of(root, loc), _path(loc, data), msg))
    if problems or policy is None:
        problems.sort(key=lambda p: p.line or 0)
        raise PolicyError(source, problems)
    return policy


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy at `path`, or the one packaged with keywatch."""
    if path is None:
        packaged = resources.files("serving.policy").joinpath(DEFAULT_POLICY)
        text = packaged.read_text(encoding="utf-8")
        return parse_policy(text, source=f"(packaged) {DEFAULT_POLICY}")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(p), [Problem(None, "", f"cannot read: {exc.strerror}")]) from None
    return parse_policy(text, source=str(p))


class PolicySource:
    """The policy in force, reloaded when its file changes (checked at most once a second).

    A broken new file is refused with a logged error and the previous policy stays in
    force; the same broken version is not re-parsed until the file changes again.
    """

    def __init__(self, path: str | Path | None = None, *, policy: Policy | None = None,
                 check_interval_s: float = 1.0) -> None:
        self.path = Path(path) if path is not None else None
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._policy = policy if policy is not None else load_policy(self.path)
        self._checked = time.monotonic()
        self.version = 1
        self.last_error: str | None = None

    @classmethod
    def fixed(cls, policy: Policy) -> PolicySource:
        return cls(None, policy=policy)

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> Policy:
        if self.path is None:
            return self._policy
        now = time.monotonic()
        if now - self._checked < self.check_interval_s:
            return self._policy
        with self._lock:
            if now - self._checked < self.check_interval_s:
                return self._policy
            self._checked = now
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:
                return self._policy
            self._stamp = stamp
            try:
                self._policy = load_policy(self.path)
            except PolicyError as exc:
                self.last_error = str(exc)
                log.error("policy reload refused, previous policy stays in force: %s", exc)
            else:
                self.version += 1
                self.last_error = None
                log.info("policy reloaded from %s: %s", self.path, self._policy.summary())
        return self._policy
