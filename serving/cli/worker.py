"""Stream ingestion: `keywatch worker` scores events from a Redis Stream consumer group.

Why: a gateway that cannot wait for a decision in its request path (or that wants to
survive keywatch restarts without buffering on its side) writes each call to a Redis
Stream and moves on; a pool of workers scores them with the same `Scorer` as the API and
publishes the decisions to another stream. The hard part is doing that at least once
without ever counting an event twice:

- Events: `XADD <stream_events> * event <event JSON>` (default stream `kw:events`,
  setting `stream_events`); `keywatch ingest FILE` does it for a JSONL file.
- Workers read with `XREADGROUP` (group `stream_group`, blocking `--block-ms`) and, every
  so often, take over entries another worker left pending for longer than
  `stream_claim_idle_ms` (`XAUTOCLAIM`) — a worker that was killed leaves its entries
  pending, and they are re-delivered to a live one.
- Dedupe per event id (the event's `event_id`, else the stream entry id): the key
  `<stream_decisions>:dedupe:<event id>` is set `processing:<consumer>` with `SET NX EX`
  before scoring, and replaced by `done:<decision entry id>` *in the same Lua call* that
  XADDs the decision to `stream_decisions` (MAXLEN ~ `stream_decisions_maxlen`). A
  decision is therefore published at most once per event id (within
  `stream_dedupe_ttl_s`), and "done" implies "published". Only then is the entry XACKed
  (and, by default, XDELed: the events stream holds raw API keys, which should not stay
  in Redis longer than needed).
- Re-scoring is safe: a redelivered event whose dedupe key says "done" is just acked. One
  that says "processing" (its worker died mid-way) is scored again inside
  `OnceRedisStore.once(event id)`: every state write is applied at most once per event,
  and a repeat returns the results cached by the first application, so the counters are
  not incremented twice and the decision comes out the same.

A decision entry has the fields `event_id`, `entry` (the events-stream entry id) and
either `decision` (the decision JSON, as the API returns it) or `error` (an event that
cannot be parsed or scored; it is acked, not retried forever). On Redis Cluster, give the
decisions stream a hash tag (e.g. `{kw}:decisions`) so its dedupe keys share its slot.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from features.contract import Event
from features.stores.base import StoreError
from features.stores.once import OnceRedisStore
from serving.engine.event_log import EventLog
from serving.engine.scorer import Scorer, decision_line
from serving.settings import Settings

log = logging.getLogger("keywatch.worker")

PUBLISH_ONCE_LUA = """
-- KEYS[1] dedupe key, KEYS[2] decisions stream
-- ARGV: field name, record JSON, maxlen, ttl, event id, entry id
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 5) == 'done:' then return 0 end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
  'event_id', ARGV[5], 'entry', ARGV[6], ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], 'done:' .. id, 'EX', ARGV[4])
return 1
"""


@dataclass(slots=True)
class WorkerConfig:
    stream: str = "kw:events"
    decisions_stream: str = "kw:decisions"
    group: str = "keywatch"
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    block_ms: int = 1000
    count: int = 64
    claim_idle_ms: int = 30_000
    decisions_maxlen: int = 1_000_000
    dedupe_ttl_s: int = 86_400
    delete_acked: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerConfig:
        base = cls(stream=settings.stream_events, decisions_stream=settings.stream_decisions,
                   group=settings.stream_group, claim_idle_ms=settings.stream_claim_idle_ms,
                   decisions_maxlen=settings.stream_decisions_maxlen,
                   dedupe_ttl_s=settings.stream_dedupe_ttl_s,
                   delete_acked=settings.stream_delete_acked)
        for name, value in overrides.items():
            if value is not None:
                setattr(base, name, value)
        return base


@dataclass(slots=True)
class WorkerStats:
    scored: int = 0
    duplicates: int = 0
    errors: int = 0
    claimed: int = 0
    store_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"scored": self.scored, "duplicates": self.duplicates, "errors": self.errors,
                "claimed": self.claimed, "store_failures": self.store_failures}


@dataclass(slots=True)
class _Item:
    entry_id: str
    event_id: str
    event: Event | None = None
    error: str | None = None
    record: dict[str, Any] | None = None
    once_keys: list[str] = field(default_factory=list)


def _parse(entry_id: str, fields: dict[str, str] | None) -> _Item:
    if not fields or "event" not in fields:
        return _Item(entry_id, entry_id, error="stream entry has no 'event' field")
    raw = fields["event"]
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return _Item(entry_id, entry_id, error=f"event is not valid JSON: {exc.msg}")
    if not isinstance(obj, dict):
        return _Item(entry_id, entry_id, error="event must be a JSON object")
    event_id = obj.get("event_id")
    event_id = str(event_id) if event_id not in (None, "") else entry_id
    try:
        return _Item(entry_id, event_id, event=Event.model_validate(obj))
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'event'}: "
                 f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        return _Item(entry_id, event_id, error="invalid event: " + "; ".join(parts))


class StreamWorker:
    """One consumer of the events stream; run several (processes) for throughput."""

    def __init__(self, client: redis.Redis, scorer: Scorer, config: WorkerConfig, *,
                 event_log: EventLog | None = None) -> None:
        if not isinstance(scorer.store, OnceRedisStore):
            raise TypeError("the stream worker needs a scorer over an OnceRedisStore")
        self.client = client
        self.scorer = scorer
        self.store: OnceRedisStore = scorer.store
        self.config = config
        self.event_log = event_log
        self.stats = WorkerStats()
        self._publish = client.register_script(PUBLISH_ONCE_LUA)

    def dedupe_key(self, event_id: str) -> str:
        return f"{self.config.decisions_stream}:dedupe:{event_id}"

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.config.stream, self.config.group, id="0",
                                      mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- loop ----------------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None,
            idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until `stop` is set (or nothing arrived for `idle_exit_s`)."""
        stop = stop or threading.Event()
        cfg = self.config
        backoff = 0.0
        last_claim = 0.0
        last_work = time.monotonic()
        own_pending = True  # after a restart, first finish what this consumer held
        group_ready = False
        while not stop.is_set():
            try:
                if backoff:
                    stop.wait(backoff)
                if not group_ready:
                    self.ensure_group()
                    group_ready = True
                worked = 0
                if own_pending:
                    worked += self._read("0")
                    own_pending = worked > 0
                now = time.monotonic()
                if now - last_claim >= max(0.2, cfg.claim_idle_ms / 2000):
                    worked += self.claim_stale()
                    last_claim = now
                if not own_pending:
                    worked += self._read(">", block_ms=cfg.block_ms)
                backoff = 0.0
            except (redis.RedisError, StoreError) as exc:
                self.stats.store_failures += 1
                group_ready = False  # a restarted Redis may have lost the group
                own_pending = True  # retry what this consumer holds, without waiting
                backoff = min(5.0, max(0.1, backoff * 2))
                log.warning("worker %s: redis unavailable (%s), retrying in %.1fs",
                            cfg.consumer, exc, backoff)
                continue
            if worked:
                last_work = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_work >= idle_exit_s:
                break
        self._finish()
        return self.stats

    def _finish(self) -> None:
        try:
            self.scorer.flush()
        except StoreError as exc:
            log.warning("worker: baseline updates not flushed at exit: %s", exc)
        if self.event_log is not None:
            self.event_log.flush()

    def _read(self, start: str, *, block_ms: int | None = None) -> int:
        cfg = self.config
        resp = self.client.xreadgroup(cfg.group, cfg.consumer, {cfg.stream: start},
                                      count=cfg.count, block=block_ms)
        entries = resp[0][1] if resp else []
        if not entries:
            return 0
        return self.process(entries)

    def claim_stale(self) -> int:
        """Take over entries left pending too long by other (dead) consumers."""
        cfg = self.config
        start = "0-0"
        done = 0
        for _ in range(100):  # bounded: at most 100 pages per round
            resp = self.client.xautoclaim(cfg.stream, cfg.group, cfg.consumer,
                                          min_idle_time=cfg.claim_idle_ms, start_id=start,
                                          count=cfg.count)
            start, entries = resp[0], resp[1]
            if entries:
                self.stats.claimed += len(entries)
                log.info("worker %s claimed %d stale entries", cfg.consumer, len(entries))
                done += self.process(entries)
            if start in ("0-0", b"0-0"):
                break
        return done

    # ---- one batch -----------------------------------------------------------------------
    def process(self, entries: Iterable[tuple[str, dict[str, str] | None]]) -> int:
        """Score, publish, then ack a batch of stream entries; returns entries handled."""
        cfg = self.config
        # (Redis 6.2's XAUTOCLAIM returns entries trimmed from the stream as id None)
        items = [_parse(entry_id, fields) for entry_id, fields in entries
                 if entry_id is not None]
        if not items:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.set(self.dedupe_key(item.event_id), f"processing:{cfg.consumer}", nx=True,
                     ex=cfg.dedupe_ttl_s)
        acquired = pipe.execute()
        unclear = [item for item, ok in zip(items, acquired, strict=True) if not ok]
        done_ids: set[str] = set()
        if unclear:
            states = self.client.mget([self.dedupe_key(i.event_id) for i in unclear])
            done_ids = {i.entry_id for i, s in zip(unclear, states, strict=True)
                        if s and s.startswith("done:")}
        to_ack: list[_Item] = []
        to_publish: list[_Item] = []
        failure: Exception | None = None
        for item in items:
            if item.entry_id in done_ids:
                self.stats.duplicates += 1
                to_ack.append(item)
                continue
            if item.event is None:
                item.record = {"error": item.error}
                to_publish.append(item)
                continue
            try:
                self._score(item)
            except StoreError as exc:
                failure = exc  # leave this and the rest pending; publish what is done
                break
            to_publish.append(item)
        self._publish_and_ack(to_publish, to_ack)
        if failure is not None:
            raise failure
        return len(to_publish) + len(to_ack)

    def _score(self, item: _Item) -> None:
        assert item.event is not None
        try:
            arrived = int(item.entry_id.split("-", 1)[0]) / 1000  # the stream's own clock
            with self.store.once(f"ev:{item.event_id}") as keys, \
                    self.scorer.pinned_clock(arrived):
                decision = self.scorer.score(item.event)
                self.scorer.flush()  # this event's baseline updates, inside its scope
            item.once_keys = keys
        except StoreError:
            raise
        except Exception as exc:  # a bug or poison event: report it, never retry forever
            log.exception("worker: event %s could not be scored", item.event_id)
            item.record = {"error": f"{type(exc).__name__}: {exc}"}
            return
        item.record = {"decision": decision_line(decision)}
        if self.event_log is not None:
            self.event_log.append(item.event, decision.key_id)

    def _publish_and_ack(self, published: list[_Item], duplicates: list[_Item]) -> None:
        cfg = self.config
        if published:
            pipe = self.client.pipeline(transaction=False)
            for item in published:
                assert item.record is not None
                kind = "decision" if "decision" in item.record else "error"
                body = item.record[kind]
                payload = json.dumps(body, separators=(",", ":")) if kind == "decision" \
                    else str(body)
                self._publish(keys=[self.dedupe_key(item.event_id), cfg.decisions_stream],
                              args=[kind, payload, cfg.decisions_maxlen, cfg.dedupe_ttl_s,
                                    item.event_id, item.entry_id], client=pipe)
            results = pipe.execute()
            for item, fresh in zip(published, results, strict=True):
                if item.record and "error" in item.record:
                    self.stats.errors += 1
                elif fresh:
                    self.stats.scored += 1
                else:
                    self.stats.duplicates += 1
        done = [*published, *duplicates]
        if not done:
            return
        ids = [item.entry_id for item in done]
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(cfg.stream, cfg.group, *ids)
        if cfg.delete_acked:
            pipe.xdel(cfg.stream, *ids)
        once_keys = [k for item in done for k in item.once_keys]
        for key in once_keys:
            pipe.delete(key)
        pipe.execute()


# ---- building and ingesting --------------------------------------------------------------
def stream_client(url: str, *, block_ms: int, timeout_s: float) -> redis.Redis:
    """A client whose read timeout outlasts a blocking XREADGROUP."""
    return redis.Redis.from_url(url, socket_timeout=block_ms / 1000 + max(timeout_s, 1.0),
                                socket_connect_timeout=timeout_s, decode_responses=True)


def build_worker(settings: Settings, config: WorkerConfig) -> StreamWorker:
    from serving.engine.factory import build_scorer

    if not settings.store.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("the stream worker needs a redis:// store (--store redis://...)")
    store = OnceRedisStore(settings.store, namespace=settings.redis_namespace,
                           timeout_s=settings.redis_timeout_s,
                           once_ttl_s=config.dedupe_ttl_s)
    scorer = build_scorer(settings, store=store, live=True)
    event_log = (EventLog(settings.data_dir / "events",
                          retention_days=settings.event_log_retention_days,
                          writer_id=f"worker-{config.consumer}")
                 if settings.event_log else None)
    client = stream_client(settings.store, block_ms=config.block_ms,
                           timeout_s=settings.redis_timeout_s)
    return StreamWorker(client, scorer, config, event_log=event_log)


def run_worker(settings: Settings, config: WorkerConfig, *,
               idle_exit_s: float | None = None) -> WorkerStats:
    """Run until SIGTERM/SIGINT (finishing the batch in hand) or idle for idle_exit_s."""
    worker = build_worker(settings, config)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("worker %s: signal %d, stopping after this batch", config.consumer, signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        return worker.run(stop=stop, idle_exit_s=idle_exit_s)
    finally:
        worker.store.close()
        worker.client.close()


def ingest_file(client: redis.Redis, path: Path, *, stream: str = "kw:events",
                maxlen: int | None = None, chunk: int = 500) -> dict[str, int]:
    """XADD each JSON-object line of a JSONL file as `event`; returns counts."""
    added = skipped = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            text = line.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(obj, dict):
                skipped += 1
                continue
            pipe.xadd(stream, {"event": text}, maxlen=maxlen, approximate=True)
            pending += 1
            if pending >= chunk:
                pipe.execute()
                added += pending
                pending = 0
    if pending:
        pipe.execute()
        added += pending
    return {"ingested": added, "skipped": skipped}
