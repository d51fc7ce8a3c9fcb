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

Poison entries and dead letters. An entry is read with size, depth and type limits
(`load_json`), so no entry can crash the parser; one that is refused can never succeed
and goes to the dead-letter stream (`<stream_events>:dead`, setting
`stream_dead_letters`) at once. An entry whose scoring raises is left pending and retried
on its next delivery. Redis counts deliveries; an entry delivered `stream_max_deliveries`
times without completing (it raised every time, or a worker holding it died every time)
goes to the dead letters with its last error, and the worker goes on. Redelivered entries
are scored and acked one by one, so the first entry still pending after a crash is the one
the crash happened on: at most that one is given up per read. A dead letter holds the key
id, never the raw key (`keywatch worker --dead-letters` lists them); each one also gets an
`error` record on the decisions stream, so whoever waits for its decision learns why.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, start_http_server
from pydantic import ValidationError

from features.contract import Event, JsonRefused, load_json
from features.keys import KeyHasher
from features.stores.base import StoreError
from features.stores.once import OnceRedisStore
from features.validation import describe
from serving.engine.event_log import EventLog
from serving.engine.scorer import Scorer, decision_line
from serving.observability.redaction import redact_free_text, redact_text
from serving.settings import Settings

log = logging.getLogger("keywatch.worker")

MAX_ENTRY_BYTES = 64 * 1024
"""Largest event a stream entry (or an ingested line) may hold."""

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
    max_deliveries: int = 5
    dead_letters: str = "kw:events:dead"
    dead_letters_maxlen: int = 100_000
    max_entry_bytes: int = MAX_ENTRY_BYTES

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerConfig:
        base = cls(stream=settings.stream_events, decisions_stream=settings.stream_decisions,
                   group=settings.stream_group, claim_idle_ms=settings.stream_claim_idle_ms,
                   decisions_maxlen=settings.stream_decisions_maxlen,
                   dedupe_ttl_s=settings.stream_dedupe_ttl_s,
                   delete_acked=settings.stream_delete_acked,
                   max_deliveries=settings.stream_max_deliveries,
                   dead_letters=settings.dead_letter_stream,
                   dead_letters_maxlen=settings.stream_dead_letters_maxlen)
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
    dead_letters: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"scored": self.scored, "duplicates": self.duplicates, "errors": self.errors,
                "claimed": self.claimed, "store_failures": self.store_failures,
                "dead_letters": self.dead_letters, "retries": self.retries}


class WorkerMetrics:
    """Prometheus counters of one worker (`keywatch worker --metrics-port`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.entries = Counter("keywatch_worker_entries", "Stream entries handled, by outcome",
                               ["outcome"], registry=self.registry)
        self.dead_letters = Counter(
            "keywatch_worker_dead_letters", "Entries moved to the dead-letter stream",
            ["reason"], registry=self.registry)


@dataclass(slots=True)
class _Item:
    entry_id: str
    event_id: str
    event: Event | None = None
    error: str | None = None
    record: dict[str, Any] | None = None
    once_keys: list[str] = field(default_factory=list)
    raw: str = ""
    obj: dict[str, Any] | None = None
    deliveries: int = 1
    failed: str | None = None  # scoring raised: left pending for a retry
    dead_reason: str = "refused"  # or "gave_up": delivered max_deliveries times


def _parse(entry_id: str, fields: dict[str, str] | None, *,
           max_bytes: int = MAX_ENTRY_BYTES) -> _Item:
    """The entry as an event, or an item carrying the reason it is refused. Never raises:
    a stream entry is untrusted bytes, and one bad entry must not stop the worker."""
    if not fields or "event" not in fields:
        return _Item(entry_id, entry_id, error="stream entry has no 'event' field")
    raw = fields["event"]
    if not isinstance(raw, str):
        return _Item(entry_id, entry_id, error="the 'event' field is not text")
    try:
        obj = load_json(raw, max_bytes=max_bytes)
    except JsonRefused as exc:
        return _Item(entry_id, entry_id, raw=raw, error=f"event refused: {exc}")
    if not isinstance(obj, dict):
        return _Item(entry_id, entry_id, raw=raw, error="event must be a JSON object")
    event_id = obj.get("event_id")
    event_id = str(event_id)[:256] if event_id not in (None, "") else entry_id
    try:
        return _Item(entry_id, event_id, event=Event.model_validate(obj), raw=raw, obj=obj)
    except ValidationError as exc:
        return _Item(entry_id, event_id, raw=raw, obj=obj,
                     error="invalid event: " + describe(exc))
    except Exception as exc:  # a validator bug must not become a crash loop
        return _Item(entry_id, event_id, raw=raw, obj=obj,
                     error=f"event could not be read: {type(exc).__name__}")


class StreamWorker:
    """One consumer of the events stream; run several (processes) for throughput."""

    def __init__(self, client: redis.Redis, scorer: Scorer, config: WorkerConfig, *,
                 event_log: EventLog | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        if not isinstance(scorer.store, OnceRedisStore):
            raise TypeError("the stream worker needs a scorer over an OnceRedisStore")
        self.client = client
        self.scorer = scorer
        self.store: OnceRedisStore = scorer.store
        self.config = config
        self.event_log = event_log
        self.stats = WorkerStats()
        self.metrics = metrics or WorkerMetrics()
        self._publish = client.register_script(PUBLISH_ONCE_LUA)
        self._last_error: dict[str, str] = {}  # entry id -> why its scoring raised

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
            except Exception:  # a bug: never a crash loop; what is held is redelivered
                own_pending = True
                backoff = min(5.0, max(0.1, backoff * 2))
                log.exception("worker %s: unexpected error, retrying in %.1fs",
                              cfg.consumer, backoff)
                continue
            if worked:
                last_work = time.monotonic()
            elif self.event_log is not None and self.event_log.buffered:
                self.event_log.flush()  # idle: what was scored reaches the disk now
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
        return self.process(entries, redelivered=start != ">")

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
                done += self.process(entries, redelivered=True)
            if start in ("0-0", b"0-0"):
                break
        return done

    # ---- one batch -----------------------------------------------------------------------
    def process(self, entries: Iterable[tuple[str, dict[str, str] | None]], *,
                redelivered: bool = False) -> int:
        """Score, publish, then ack a batch of stream entries; returns entries handled.

        Redelivered entries (read again from this consumer's history, or claimed from
        another) are handled one by one, each acked when done, and the first of them
        delivered `max_deliveries` times goes to the dead letters untried."""
        cfg = self.config
        # (Redis 6.2's XAUTOCLAIM returns entries trimmed from the stream as id None)
        items = [_parse(entry_id, fields, max_bytes=cfg.max_entry_bytes)
                 for entry_id, fields in entries if entry_id is not None]
        if not items:
            return 0
        if redelivered:
            self._delivery_counts(items)
        if not redelivered:
            return self._handle(items, self._claim_dedupe(items), give_up_first=False)
        handled, give_up = 0, True
        for item in items:  # each one done (published, acked) before the next is tried
            handled += self._handle([item], self._claim_dedupe([item]), give_up_first=give_up)
            give_up = give_up and item.deliveries < cfg.max_deliveries
        return handled

    def _claim_dedupe(self, items: list[_Item]) -> set[str]:
        """Mark each event id as in progress; returns the entries already done before."""
        cfg = self.config
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.set(self.dedupe_key(item.event_id), f"processing:{cfg.consumer}", nx=True,
                     ex=cfg.dedupe_ttl_s)
        acquired = pipe.execute()
        unclear = [item for item, ok in zip(items, acquired, strict=True) if not ok]
        if not unclear:
            return set()
        states = self.client.mget([self.dedupe_key(i.event_id) for i in unclear])
        return {i.entry_id for i, st in zip(unclear, states, strict=True)
                if st and st.startswith("done:")}

    def _delivery_counts(self, items: list[_Item]) -> None:
        """Redis's delivery count of each entry (XPENDING), one round trip."""
        cfg = self.config
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.xpending_range(cfg.stream, cfg.group, min=item.entry_id, max=item.entry_id,
                                count=1)
        for item, rows in zip(items, pipe.execute(), strict=True):
            if rows:
                item.deliveries = int(rows[0].get("times_delivered", 1))

    def _handle(self, items: list[_Item], done_ids: set[str], *, give_up_first: bool) -> int:
        cfg = self.config
        to_ack: list[_Item] = []
        to_publish: list[_Item] = []
        dead: list[_Item] = []
        failure: Exception | None = None
        for item in items:
            if item.entry_id in done_ids:
                self.stats.duplicates += 1
                to_ack.append(item)
                continue
            if give_up_first and item.deliveries >= cfg.max_deliveries:
                known = self._last_error.get(item.entry_id)
                item.error = (f"given up after {item.deliveries} deliveries: "
                              + (known or "every worker holding it stopped before it "
                                          "was done (crashed or was killed)"))
                item.event, item.dead_reason = None, "gave_up"
                give_up_first = False
            if item.event is None:
                item.record = {"error": item.error}
                to_publish.append(item)
                dead.append(item)
                continue
            try:
                self._score(item)
            except StoreError as exc:
                failure = exc  # leave this and the rest pending; publish what is done
                break
            if item.failed is not None:
                if item.deliveries < cfg.max_deliveries:
                    self.stats.retries += 1  # left pending: retried on its next delivery
                    self._last_error[item.entry_id] = item.failed
                    continue
                item.error = f"given up after {item.deliveries} deliveries: {item.failed}"
                item.record, item.dead_reason = {"error": item.error}, "gave_up"
                dead.append(item)
            to_publish.append(item)
        self._dead_letter(dead)
        self._publish_and_ack(to_publish, to_ack)
        if failure is not None:
            raise failure
        return len(to_publish) + len(to_ack)

    def _dead_letter(self, items: list[_Item]) -> None:
        """Copy refused entries to the dead-letter stream, the raw key replaced by its id."""
        if not items:
            return
        cfg = self.config
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.xadd(cfg.dead_letters, dead_letter_fields(item, self.scorer.hasher,
                                                           cfg.consumer),
                      maxlen=cfg.dead_letters_maxlen, approximate=True)
        pipe.execute()
        for item in items:
            self._last_error.pop(item.entry_id, None)
            self.stats.dead_letters += 1
            self.metrics.dead_letters.labels(reason=item.dead_reason).inc()
            log.warning("worker %s: entry %s moved to %s: %s", cfg.consumer, item.entry_id,
                        cfg.dead_letters, item.error)

    def _score(self, item: _Item) -> None:
        assert item.event is not None
        try:
            arrived = int(item.entry_id.split("-", 1)[0]) / 1000  # the stream's own clock
            with self.store.once(f"ev:{item.event_id}") as keys, \
                    self.scorer.pinned_clock(arrived):
                decision = self.scorer.score(item.event)
                self.scorer.flush()  # this event's baseline updates, inside its scope
            item.once_keys = keys
        except StoreError as exc:
            if not getattr(exc, "data_error", False):
                raise  # the store is down: leave this and the rest pending, back off
            log.error("worker: event %s refused by the store: %s", item.event_id, exc)
            item.failed = redact_text(f"the store refused it: {exc}")[:500]
            return
        except Exception as exc:  # a bug or poison event: retried, then a dead letter
            log.exception("worker: event %s could not be scored", item.event_id)
            item.failed = redact_text(f"{type(exc).__name__}: {exc}")[:500]
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
                    self.metrics.entries.labels(outcome="error").inc()
                elif fresh:
                    self.stats.scored += 1
                    self.metrics.entries.labels(outcome="scored").inc()
                else:
                    self.stats.duplicates += 1
        done = [*published, *duplicates]
        if not done:
            return
        for item in done:
            self._last_error.pop(item.entry_id, None)
        ids = [item.entry_id for item in done]
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(cfg.stream, cfg.group, *ids)
        if cfg.delete_acked:
            pipe.xdel(cfg.stream, *ids)
        once_keys = [k for item in done for k in item.once_keys]
        for key in once_keys:
            pipe.delete(key)
        pipe.execute()


def dead_letter_fields(item: _Item, hasher: KeyHasher, consumer: str) -> dict[str, str]:
    """What a dead letter keeps: the entry's id, why, and the event with its raw key
    replaced by the key id (an event that does not parse: a redacted preview)."""
    fields = {"entry": item.entry_id, "event_id": item.event_id, "reason": item.dead_reason,
              "error": redact_text(item.error or "")[:1000], "deliveries": str(item.deliveries),
              "consumer": consumer, "at": f"{time.time():.3f}", "bytes": str(len(item.raw))}
    if item.obj is not None:
        safe = dict(item.obj)
        key = safe.pop("api_key", None)
        if isinstance(key, str) and key:
            safe["key_id"] = hasher.key_id(key)
        fields["event"] = redact_text(json.dumps(safe, default=str)[:4000])
    elif item.raw:
        fields["preview"] = redact_free_text(item.raw[:200])
    return fields


def read_dead_letters(client: redis.Redis, stream: str, *,
                      count: int = 100) -> list[dict[str, Any]]:
    """The newest dead letters, newest first (for `keywatch worker --dead-letters`)."""
    return [{"id": entry_id, **fields}
            for entry_id, fields in client.xrevrange(stream, count=count)]


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


def print_dead_letters(settings: Settings, config: WorkerConfig, *, count: int) -> int:
    """`keywatch worker --dead-letters`: the newest dead letters as JSON lines."""
    if not settings.store.startswith(("redis://", "rediss://", "unix://")):
        print("keywatch: --dead-letters needs --store redis://...", file=sys.stderr)
        return 2
    client = stream_client(settings.store, block_ms=0, timeout_s=settings.redis_timeout_s)
    try:
        letters = read_dead_letters(client, config.dead_letters, count=count)
        total = client.xlen(config.dead_letters)
    finally:
        client.close()
    for letter in letters:
        print(json.dumps(letter))
    print(json.dumps({"dead_letters": total, "stream": config.dead_letters,
                      "shown": len(letters)}), file=sys.stderr)
    return 0


def run_worker(settings: Settings, config: WorkerConfig, *,
               idle_exit_s: float | None = None,
               metrics_port: int | None = None) -> WorkerStats:
    """Run until SIGTERM/SIGINT (finishing the batch in hand) or idle for idle_exit_s."""
    worker = build_worker(settings, config)
    if metrics_port is not None:
        start_http_server(metrics_port, registry=worker.metrics.registry)
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
    with Path(path).open("rb") as fh:  # bytes: a line that is not UTF-8 is skipped alone
        for line in fh:
            try:
                text = line.decode("utf-8").strip()
                obj = load_json(text, max_bytes=MAX_ENTRY_BYTES) if text else None
            except (UnicodeDecodeError, JsonRefused):
                skipped += 1
                continue
            if not text:
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
