"""The policy file: rules, fusion settings, graduated responses and allow-lists as data.

A policy is YAML validated strictly (unknown keys are refused, every rule type checks its
own params) so that a typo is an error with a line number, never a rule that silently
never fires. `keywatch policy check FILE` runs exactly the loader the service uses.

Running services pick up a changed file without a restart (`PolicySource`): the file's
mtime is checked at most once a second, and a broken new version is refused with a
logged error while the previous policy stays in force — a bad edit must not disarm
detection nor take the service down. "Broken" includes a file that cannot be read, is not
UTF-8, is over `MAX_POLICY_BYTES`, nests or expands (YAML aliases) past sane limits, or
holds a number that is not finite (`.nan` as a ban length once crashed the next ban).
A request is scored under one policy version: `PolicySource.pinned()` holds the version
in force for the thread while a batch is scored, so a reload never splits a batch.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
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
MAX_DURATION_S = 100 * 365 * 86400
"""Longest finite duration (100 years); anything longer is written `permanent`."""
MAX_POLICY_BYTES = 1024 * 1024
"""Largest policy file read: the packaged one is 10 KB."""
MAX_POLICY_NODES = 100_000
"""Most YAML nodes a policy may expand to, counting every alias use (no 'billion laughs')."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$")
_UNIT_S = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """`90`, `"30m"`, `"2h"`, `"7d"` or `"permanent"` as seconds (permanent = inf)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '30m', '2h', '7d'")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds (or 'permanent')")
        if value <= 0:
            raise ValueError("a duration must be positive")
        return _bounded(float(value))
    if isinstance(value, str):
        if value.strip().lower() in ("permanent", "forever"):
            return PERMANENT_S
        m = _DURATION.match(value.lower())
        if m and float(m.group(1)) > 0:
            return _bounded(float(m.group(1)) * _UNIT_S[m.group(2)])
    raise ValueError(f"{value!r} is not a duration: use seconds or text like '30m', '2h', "
                     "'7d', or 'permanent'")


def _bounded(seconds: float) -> float:
    if seconds > MAX_DURATION_S:
        raise ValueError("a duration is at most 100 years; write 'permanent' for longer")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierResponse(_Strict):
    """What to do at one severity tier."""

    action: Literal["none", "log", "alert", "throttle", "ban", "perm_ban"]
    limit_per_min: int | None = Field(default=None, ge=1)
    """For throttle: the rate the gateway allows a key with no learned normal rate."""
    retry_after_s: int = Field(default=60, ge=1)
    rate_factor: float = Field(default=2.0, ge=1.0, le=100.0)
    """For throttle: the limit is this multiple of the key's normal rate for the hour."""
    min_per_min: int = Field(default=5, ge=1)
    """For throttle: the limit never goes below this many requests per minute."""
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
    ladder: tuple[float, ...] = Field(default=(1800, 7200, 86400), min_length=1)
    """Ban lengths for the 1st, 2nd, 3rd... offence of one incident kind; the last
    repeats. Offences of another kind (identity vs attack) start their own ladder."""
    allow_permanent: bool = False
    """Off by default: a permanent ban is an operator's act. Off, a `permanent` step of
    the ladder (and a tier's `perm_ban`) becomes the longest finite ban."""
    decay_after: float = 7 * 86400
    """Each clean period this long since the last ban forgives one step of the ladder."""
    spare_established_after: float | None = None
    """A key's automatic ban still lets through calls from the address prefixes (/24,
    /48) its normal traffic used at least this long before the ban's incident began:
    the owner's own networks, learned before any intruder's. None: a key ban stops
    every call. An operator's ban always stops every call."""

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

    @field_validator("spare_established_after", mode="before")
    @classmethod
    def _spare(cls, value: Any) -> float | None:
        if value is None:
            return None
        seconds = parse_duration(value)
        if seconds == PERMANENT_S:
            raise ValueError("spare_established_after must be finite")
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


def _expanded_nodes(root: yaml.Node | None, limit: int) -> int:
    """How many nodes the document expands to, every alias counted in full (memoised, so
    the count itself is cheap however big the expansion); stops counting past `limit`."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = memo.get(id(node))
        if known is not None:
            return known
        memo[id(node)] = limit + 1  # a cycle counts as over the limit
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        memo[id(node)] = min(total, limit + 1)
        return memo[id(node)]

    return size(root) if root is not None else 0


def _non_finite(data: Any, root: yaml.Node | None) -> list[Problem]:
    """Every number in the policy that is NaN or infinite (YAML's `.nan`, `.inf`)."""
    problems = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(_line_of(root, loc), _path(loc, data),
                                    f"{value} is not a finite number (write 'permanent' "
                                    "for a ban with no end)"))
        elif isinstance(value, dict):
            stack.extend((v, (*loc, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(value))
    return problems


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree and its data, with size limits; PolicyError when unusable."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if _expanded_nodes(root, MAX_POLICY_NODES) > MAX_POLICY_NODES:
            raise PolicyError(source, [Problem(None, "", "the YAML expands to more than "
                                                         f"{MAX_POLICY_NODES} nodes (aliases)")])
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [Problem(mark.line + 1 if mark else None, "",
                                           f"not valid YAML: {problem}")]) from None
    except RecursionError:
        raise PolicyError(source, [Problem(None, "", "the YAML is nested too deeply")]) from None
    return root, data


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate policy text; raise PolicyError naming every problem and its line."""
    root, data = _compose(text, source)
    if not isinstance(data, dict):
        raise PolicyError(source, [Problem(1, "", "a policy is a mapping with at least "
                                                  "'rules'")])
    problems: list[Problem] = _non_finite(data, root)
    if problems:  # NaN compares false with every bound: refuse it before anything else
        raise PolicyError(source, problems)
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
        with p.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(str(p), [Problem(None, "", f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(str(p), [Problem(None, "", f"over {MAX_POLICY_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(p), [Problem(None, "", f"not UTF-8 text (byte {exc.start}: "
                                                     f"{exc.reason})")]) from None
    if "\x00" in text:
        raise PolicyError(str(p), [Problem(None, "", "holds a NUL byte: not a text file")])
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
        self._pins = threading.local()

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

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Policy]:
        """Hold the policy in force for this thread: every `current()` inside the block
        returns it, so a request (a batch) is scored entirely under one version."""
        held = getattr(self._pins, "policy", None)
        if held is not None:  # already pinned by an outer block
            yield held
            return
        self._pins.policy = policy = self.current()
        try:
            yield policy
        finally:
            self._pins.policy = None

    def current(self) -> Policy:
        held = getattr(self._pins, "policy", None)
        if held is not None:
            return held
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
            except Exception as exc:  # any failure: never take scoring down with it
                self.last_error = str(exc) if isinstance(exc, PolicyError) \
                    else f"{self.path}: {type(exc).__name__}: {exc}"
                log.error("policy reload refused, previous policy stays in force: %s",
                          self.last_error)
            else:
                self.version += 1
                self.last_error = None
                log.info("policy reloaded from %s: %s", self.path, self._policy.summary())
        return self._policy
