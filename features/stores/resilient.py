"""The Redis outage policy: keep deciding (or refuse cleanly), lose no state change.

Why: keywatch sits in the request path of an API gateway. If its shared Redis goes away,
a keywatch that hangs or crashes takes the gateway down with it, and a keywatch that
simply drops the state changes of the outage window forgets exactly the traffic an
attacker would want forgotten. `ResilientStore` wraps the `RedisStore` and, while Redis
fails:

- marks itself degraded (`status()`: state, since, records spooled) so `/readyz` says so;
- answers from a local `MemoryStore` (policy `fail_open`: decisions keep coming, made
  from what this process has seen since the outage began) or raises `StoreUnavailable`
  (policy `fail_closed`: the API answers 503 with Retry-After);
- under fail_open, appends the write operations of every call to a durable local spool
  (`features.stores.spool`), fsync'd before the call returns. Under fail_closed a refused
  call is not spooled: a 503 means nothing was applied, so the client's retry is the
  one application (spooling it too made 100 retried events count as 112). The one call
  in flight when Redis failed may have been applied before its reply was lost; an event
  with an `event_id` is then recognised by its claim and not applied twice;
- probes Redis from a background thread every `retry_interval_s`; when it answers, the
  spool is replayed into Redis in order, segment by segment (a segment is deleted only
  after all of it was applied), the local state is dropped, and the store is normal again.
  Calls made during a replay keep being spooled; the last few records are replayed while
  holding the lock, so no write can slip in between the end of the replay and the switch.

Which operations are writes (and therefore spooled): every operation except the pure
reads GET, RING_GET, RING_SUM and RECENT_COUNT. COUNTERS, RECENT_ADD and SEEN_ADD read
*and* write — replaying them re-applies their write, which is what we want; their read
results are not needed again. An operation code this module does not know is treated as
a write (spooling a read is harmless; dropping a write is not). A request whose ops are
all pure reads is not spooled; the pure reads of a mixed request are left out of the spool.

Exactness: the replay is idempotent. Each replayed entity request runs through a guard
around the same Lua script (`lua_wrap.REPLAY_GUARD`) that, in the same atomic call, skips
it if the entity's hash field `_rs:<writer_id>` says it was applied, refuses it if the
entity's previous spooled write is missing (so a failure earlier in a pipeline cannot be
overtaken), and otherwise applies it and records its sequence number. Before each batch
the fields are read back, so an interrupted replay resumes exactly where it stopped.
The one call in flight when Redis failed is *ambiguous* (Redis may have applied
it before the connection broke, e.g. a reply lost to a timeout); it is spooled and
replayed, so it is applied at least once (at most one extra application per concurrent
in-flight call; `status()["ambiguous"]` counts them). Everything else is exactly once.
A spooled record that Redis *refuses* (a script error, not an outage) is set aside in
`<slot>/rejected.jsonl` and reported (`status()["rejected"]`), so one bad record cannot
block the recovery forever; a refused command on the live path is raised, not spooled.

If the disk fails too, fail_open keeps answering and counts `spool_errors` (those writes
are lost, and logged as such).

Enforcement during an outage: with an `EnforcementCache` the store re-reads the active
bans, limits and allow-list from Redis every few seconds while it is healthy, and seeds
the local store with them when an outage begins, so under fail_open the bans and limits
this replica last knew are still enforced (see `features.stores.enforcement_cache`).

Bounded calls: while degraded, calls never touch the network (local dict + one fsync);
only the first failing call pays the Redis socket timeout (`redis_timeout_s`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import redis

from features.stores.base import (
    GET,
    LOG_READ,
    RECENT_COUNT,
    RING_GET,
    RING_SUM,
    EntityOps,
    StateStore,
    StoreError,
)
from features.stores.enforcement_cache import EnforcementCache
from features.stores.lua_wrap import REPLAY_GUARD
from features.stores.memory import MemoryStore
from features.stores.redis_store import LuaScript, RedisStore
from features.stores.spool import SpoolRecord, WriteSpool, encode_requests

log = logging.getLogger("keywatch.store")

OutagePolicy = Literal["fail_open", "fail_closed"]
POLICIES: tuple[str, ...] = ("fail_open", "fail_closed")

PURE_READ_OPS: frozenset[str] = frozenset({GET, RING_GET, RING_SUM, RECENT_COUNT, LOG_READ})
"""Operations that never change state; everything else is a write and is spooled."""

_GUARD = LuaScript(REPLAY_GUARD)

REPLAY_MARK_PREFIX = "_rs:"
"""Hash field `_rs:<writer_id>` = highest spool sequence replayed into that entity."""


class StoreUnavailable(StoreError):
    """The shared store is down and the policy is fail_closed.

    The call's writes were spooled (`writes_kept`), so a caller must not queue them again.
    """

    def __init__(self, message: str, *, retry_after_s: int = 1, writes_kept: bool = True) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.writes_kept = writes_kept


_OUTAGE_REPLIES = ("OOM", "LOADING", "MASTERDOWN", "READONLY", "BUSY", "TRYAGAIN",
                   "CLUSTERDOWN", "NOREPLICAS")


def is_outage(exc: BaseException) -> bool:
    """True when a store failure means "unreachable or not accepting writes now".

    A refused command (a script error, a wrong type, an unknown op) is a bug, not an
    outage: spooling it would only replay the same failure forever.
    """
    if getattr(exc, "data_error", False):  # refused before it was sent (an unknown op)
        return False
    cause = exc.__cause__
    if cause is None:
        return True
    if isinstance(cause, redis.ResponseError):
        text = str(cause)
        return any(f"{word} " in text or text.startswith(word) for word in _OUTAGE_REPLIES)
    return True


def is_write(op: Sequence[Any]) -> bool:
    return not op or op[0] not in PURE_READ_OPS


def write_requests(requests: Sequence[EntityOps]) -> list[EntityOps]:
    """The write part of a call: entity requests with their pure reads left out."""
    out = []
    for req in requests:
        ops = [op for op in req.ops if is_write(op)]
        if ops:
            out.append(EntityOps(req.kind, req.entity_id, ops))
    return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


class ResilientStore(StateStore):
    """A `StateStore` that survives the outages of the Redis store it wraps.

    Parameters
    ----------
    primary:
        The shared store (a `RedisStore`); failures are its `StoreError`s.
    policy:
        `fail_open` answers from local state during an outage; `fail_closed` raises
        `StoreUnavailable`. Both spool the writes.
    spool_dir:
        Where the durable spool lives (one slot per process is taken inside it).
    local:
        The store answering during a fail_open outage (default: a fresh `MemoryStore`).
    retry_interval_s:
        How often the background probe pings Redis while degraded.
    replay_batch:
        Spool records sent per round trip during the replay.
    final_drain_records:
        When at most this many records remain, the replay finishes under the lock.
    """

    def __init__(
        self,
        primary: RedisStore,
        *,
        policy: OutagePolicy,
        spool_dir: Path,
        local: MemoryStore | None = None,
        retry_interval_s: float = 1.0,
        replay_batch: int = 200,
        final_drain_records: int = 200,
        cache: EnforcementCache | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown outage policy {policy!r}: use one of {POLICIES}")
        self.primary = primary
        self.name = primary.name
        self.policy: OutagePolicy = policy
        self.retry_interval_s = retry_interval_s
        self.replay_batch = replay_batch
        self.final_drain_records = final_drain_records
        self._local_bounds = ({"max_mb": local.max_mb, "max_entities": local.max_entities}
                              if local is not None else {})
        self._local = local or MemoryStore(**self._local_bounds)
        self.spool = WriteSpool(spool_dir)
        self._mark_field = REPLAY_MARK_PREFIX + self.spool.writer_id
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._probe: threading.Thread | None = None
        self._degraded = False
        self._since: float | None = None
        self.last_error: str | None = None
        self.outages = 0
        self.spooled_total = 0
        self.replayed_total = 0
        self.skipped_on_replay = 0  # entity requests a replay found already applied
        self.ambiguous = 0
        self.spool_errors = 0
        self.rejected = 0
        self.last_recovery_s: float | None = None
        self.cache = cache
        self._cache_thread: threading.Thread | None = None
        if cache is not None:
            self._cache_thread = threading.Thread(target=self._cache_loop, daemon=True,
                                                  name="keywatch-enforcement-cache")
            self._cache_thread.start()
        self._probe_now = False
        if self.spool.pending:
            # a previous run left writes behind: replay them before any new write
            self._probe_now = True
            self._enter_degraded(f"{self.spool.pending} spooled writes left by an earlier run")

    # ---- StateStore -------------------------------------------------------------------
    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        if not self._degraded:
            try:
                return self.primary.execute(requests)
            except StoreError as exc:
                if not is_outage(exc):
                    raise
                self._enter_degraded(str(exc))
                return self._degraded_call(requests, ambiguous=True)
        return self._degraded_call(requests, ambiguous=False)

    def ping(self) -> bool:
        return not self._degraded and self.primary.ping()

    def describe(self) -> str:
        state = "degraded" if self._degraded else "ok"
        return f"{self.primary.describe()} [{self.policy}, {state}]"

    def status(self) -> dict[str, Any]:
        """The outage state for `/readyz`: `state` is `ok` or `degraded`."""
        return {
            "state": "degraded" if self._degraded else "ok",
            "policy": self.policy,
            "since": _iso(self._since) if self._degraded else None,
            "last_outage_since": _iso(self._since),
            "spooled": self.spool.pending,
            "spooled_total": self.spooled_total,
            "replayed_total": self.replayed_total,
            "ambiguous": self.ambiguous,
            "spool_errors": self.spool_errors,
            "rejected": self.rejected,
            "corrupt_spool_lines": self.spool.corrupt_lines,
            "outages": self.outages,
            "last_error": self.last_error,
            "last_recovery_s": self.last_recovery_s,
            "enforcement_cache": self.cache.describe() if self.cache is not None else None,
        }

    def close(self) -> None:
        self._closed.set()
        if self._cache_thread is not None:
            self._cache_thread.join(timeout=5.0)
        probe = self._probe
        if probe is not None and probe is not threading.current_thread():
            probe.join(timeout=max(5.0, 3 * self.retry_interval_s))
        self.spool.close()
        self.primary.close()

    # ---- outage -----------------------------------------------------------------------
    def _enter_degraded(self, reason: str) -> None:
        with self._lock:
            self.last_error = reason
            if self._degraded:
                return
            self._seed_local()
            self._degraded = True
            self._since = time.time()
            self.outages += 1
            log.warning("state store unreachable, degraded (%s): %s", self.policy, reason)
            self._start_probe()

    def _seed_local(self) -> None:
        """Give the local store the bans, limits and allow-list last read from Redis."""
        if self.cache is None:
            return
        try:
            ops = self.cache.seed_ops()
            if ops:
                self._local.execute(ops)
            log.warning("enforcing %d cached bans and limits during the outage",
                        self.cache.describe()["entities"])
        except Exception:  # never let seeding stop the switch to degraded
            log.exception("could not seed the local store with cached enforcement")

    def _cache_loop(self) -> None:
        """Refresh the enforcement cache every `refresh_s` while Redis is healthy."""
        cache = self.cache
        assert cache is not None
        while not self._closed.is_set():
            if not self._degraded:
                try:
                    cache.refresh()
                except Exception as exc:  # an outage the live path will notice too
                    cache.errors += 1
                    log.debug("enforcement cache refresh failed: %s", exc)
            self._closed.wait(cache.refresh_s)

    def _start_probe(self) -> None:
        if self._probe is not None and self._probe.is_alive():
            return
        self._probe = threading.Thread(target=self._probe_loop, name="keywatch-store-probe",
                                       daemon=True)
        self._probe.start()

    def _degraded_call(self, requests: Sequence[EntityOps], *, ambiguous: bool) -> list[list[Any]]:
        if self.policy == "fail_closed":  # refused: nothing of the call is applied, ever
            if not self._degraded:
                return self.execute(requests)
            raise StoreUnavailable(
                f"state store unavailable (fail_closed): {self.last_error}",
                retry_after_s=self._retry_after(), writes_kept=False)
        writes = write_requests(requests)
        with self._lock:
            if not self._degraded:
                # recovered between our check and the lock: the store is normal again
                return self.execute(requests)
            if writes:
                try:
                    self.spool.append(writes, ambiguous=ambiguous)
                    self.spooled_total += 1
                    self.ambiguous += int(ambiguous)
                except OSError as exc:
                    self.spool_errors += 1
                    log.error("cannot spool state writes (%s): they are lost", exc)
            local = self._local
        return local.execute(requests)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.retry_interval_s))

    def _probe_loop(self) -> None:
        delay = 0.0 if self._probe_now else self.retry_interval_s
        while not self._closed.wait(delay):
            delay = self.retry_interval_s
            if not self._degraded:
                return
            if not self.primary.ping():
                continue
            try:
                if self.recover():
                    return
            except StoreError as exc:
                self.last_error = str(exc)
                log.warning("replay of spooled writes interrupted: %s", exc)
            except Exception:  # keep probing whatever happens; never kill the thread
                log.exception("unexpected error while replaying spooled writes")

    def recover(self) -> bool:
        """Replay the spool into the primary and return to normal; True when done.

        Called by the probe thread; safe to call directly (tests, shutdown hooks).
        Raises StoreError if the primary fails again during the replay.
        """
        t0 = time.monotonic()
        while not self._closed.is_set():
            with self._lock:
                if not self._degraded:
                    return True
                self.spool.rotate()
                segments = self.spool.closed_segments()
                if self.spool.pending <= self.final_drain_records:
                    # few left: finish while holding the lock, so nothing new is spooled
                    # between the end of the replay and the switch back to normal
                    for path in segments:
                        self._replay_segment(path)
                    self._back_to_normal(time.monotonic() - t0)
                    return True
            for path in segments:
                self._replay_segment(path)
        return False

    def _back_to_normal(self, took_s: float) -> None:
        self.spool.save_high_water_mark()
        self._local = MemoryStore(**self._local_bounds)
        self._degraded = False
        self.last_recovery_s = round(took_s, 3)
        log.warning("state store back: spool replayed in %.2fs (%d records so far), normal",
                    took_s, self.replayed_total)

    # ---- replay -----------------------------------------------------------------------
    def _replay_segment(self, path: Path) -> None:
        lines = self.spool.count_segment_lines(path)
        batch: list[SpoolRecord] = []
        for record in self.spool.read_segment(path):
            batch.append(record)
            if len(batch) >= self.replay_batch:
                self._replay_batch(batch)
                batch = []
        if batch:
            self._replay_batch(batch)
        self.spool.drop_segment(path, lines)

    def _replay_batch(self, records: list[SpoolRecord]) -> None:
        try:
            self._replay_records(records)
        except StoreError as exc:
            if is_outage(exc) or len(records) == 1:
                if is_outage(exc):
                    raise
                self._quarantine(records[0], exc)
                return
            # a record the store refuses (not an outage): find it, set it aside, go on
            for record in records:
                self._replay_batch([record])
            return
        self.replayed_total += len(records)

    def _replay_records(self, records: list[SpoolRecord]) -> None:
        """Apply records in order, each entity request exactly once (see REPLAY_GUARD)."""
        per_record: list[tuple[int, list[EntityOps]]] = []
        for rec in records:  # one request per entity per record: (entity, seq) is unique
            merged: dict[tuple[str, str], EntityOps] = {}
            for req in rec.requests:
                key = (req.kind, req.entity_id)
                if key in merged:
                    merged[key].ops.extend(req.ops)
                else:
                    merged[key] = EntityOps(req.kind, req.entity_id, list(req.ops))
            per_record.append((rec.seq, list(merged.values())))
        order = sorted({(r.kind, r.entity_id) for _, reqs in per_record for r in reqs})
        reads = [EntityOps(kind, eid, [(GET, self._mark_field)]) for kind, eid in order]
        last = {ent: int(res[0]) if res[0] is not None else -1
                for ent, res in zip(order, self.primary.execute(reads), strict=True)}
        chain: list[tuple[EntityOps, int, int]] = []
        for seq, reqs in per_record:
            for req in reqs:
                ent = (req.kind, req.entity_id)
                if last[ent] >= seq:
                    self.skipped_on_replay += 1  # applied by an interrupted replay
                    continue
                chain.append((req, last[ent], seq))
                last[ent] = seq
        if chain:
            self._send_chain(chain)

    def _send_chain(self, chain: list[tuple[EntityOps, int, int]]) -> None:
        primary = self.primary
        calls = []
        for req, expect, seq in chain:
            keys, argv = primary.encode(req)
            calls.append((keys, [*argv, self._mark_field, str(expect), str(seq)]))
        primary.run_script(_GUARD, calls)

    def _quarantine(self, record: SpoolRecord, exc: StoreError) -> None:
        """Keep a record the store refuses aside (never replayed again), and say so."""
        path = self.spool.dir / "rejected.jsonl"
        line = json.dumps({"seq": record.seq, "t": record.wall_time, "error": str(exc),
                           "ops": encode_requests(record.requests)}, separators=(",", ":"))
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        self.rejected += 1
        log.error("spooled write %d refused by the store, set aside in %s: %s",
                  record.seq, path, exc)
