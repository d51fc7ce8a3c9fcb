"""Graduated responses through the real Scorer: escalation, decay, dry-run, allow-lists."""

from __future__ import annotations

import pytest

from features.contract import Event
from features.keys import KeyHasher
from features.stores.base import GET, EntityOps
from features.stores.memory import MemoryStore
from serving.engine.decision import Reason
from serving.engine.scorer import Scorer
from serving.policy.fusion import Fusion
from serving.policy.responses import (
    PERMANENT,
    BanState,
    EscalationLadder,
    KeyContext,
    ban_writes,
    network_is_new,
    plan_response,
)
from serving.policy.rules import Finding
from serving.policy.schema import parse_policy
from tests.conftest import TEST_SECRET

T0 = 1_794_999_960
HOUR = 3600.0

POLICY = """
rules:
  - {id: banned_key, type: banned, scope: key, severity: critical}
  - {id: banned_ip, type: banned, scope: ip, severity: critical}
  - {id: rate_soft, type: rate_limit, group: volume, severity: high,
     params: {window: 1m, limit: 10}}
  # declared attack evidence (a scraper's signature, say): volume alone would never ban
  - {id: rate_hard, type: rate_limit, group: volume, severity: critical, evidence: attack,
     params: {window: 1m, limit: 20}}
  - id: stuffing
    type: distinct_count
    scope: ip
    severity: critical
    params: {feature: distinct_keys_by_ip_1h, limit: 5, min: {auth_fail_count_by_ip_5m: 3}}
responses:
  bans: {ladder: [30m, 2h, 24h, permanent], decay_after: 2d, allow_permanent: true}
allow_list:
  keys: [sk-trusted]
  cidrs: [10.0.0.0/8]
"""


def scorer(**kw: object) -> Scorer:
    return Scorer(store=MemoryStore(), hasher=KeyHasher(TEST_SECRET),
                  policy=parse_policy(POLICY), **kw)  # type: ignore[arg-type]


def burst(s: Scorer, start: float, key: str = "sk-a", n: int = 25, ip: str = "81.2.69.160"):
    return [s.score(Event(api_key=key, timestamp=start + i * 0.1, source_ip=ip))
            for i in range(n)]


def stored_ban(s: Scorer, kind: str, entity: str) -> str | None:
    return s.store.execute([EntityOps(kind, entity, [(GET, "ban:until")])])[0][0]


def test_throttle_then_ban_then_the_ban_holds() -> None:
    s = scorer()
    d = burst(s, T0)
    assert d[5].decision == "allow"
    assert d[10].decision == "throttle" and d[10].action.limit_per_min == 60
    assert d[20].decision == "block" and d[20].action.type == "temp_ban"
    assert d[20].action.retry_after_s == 1800 and d[20].drivers == ["rate_hard"]
    later = s.score(Event(api_key="sk-a", timestamp=T0 + 600, source_ip="81.2.69.160"))
    assert later.decision == "block" and later.reasons[0].code == "banned_key"
    assert later.action.retry_after_s == pytest.approx(1800 - 600 + 2.1, abs=1)


def test_repeat_offences_escalate_to_a_permanent_ban() -> None:
    s = scorer()
    ts = T0
    lengths = []
    for _ in range(4):
        d = burst(s, ts)
        blocked = next(x for x in d if x.decision == "block")
        lengths.append(blocked.action.retry_after_s or blocked.action.type)
        ts += (blocked.action.retry_after_s or 0) + 120  # come back after the ban
    assert lengths == [1800, 7200, 86400, "perm_ban"]
    key_id = KeyHasher(TEST_SECRET).key_id("sk-a")
    assert float(stored_ban(s, "k", key_id) or 0) >= PERMANENT


def test_without_the_switch_the_ladder_never_reaches_permanent() -> None:
    s = Scorer(store=MemoryStore(), hasher=KeyHasher(TEST_SECRET),
               policy=parse_policy(POLICY.replace(", allow_permanent: true", "")))
    ts = T0
    lengths = []
    for _ in range(5):
        d = burst(s, ts)
        blocked = next(x for x in d if x.decision == "block")
        lengths.append(blocked.action.retry_after_s or blocked.action.type)
        ts += (blocked.action.retry_after_s or 0) + 120
    assert lengths == [1800, 7200, 86400, 86400, 86400]


def test_an_incident_of_another_kind_starts_its_own_ladder() -> None:
    ladder = EscalationLadder(durations_s=(1800, 7200, 86400), decay_after_s=7 * 86400)
    after_two = BanState(until=T0 + 7200, level=2, last=T0, kind="attack")
    assert ladder.next_duration(after_two, T0 + 8000, "attack") == (86400, 3)
    assert ladder.next_duration(after_two, T0 + 8000, "identity") == (1800, 1)


def test_volume_alone_throttles_to_twice_the_normal_rate_never_bans() -> None:
    policy = parse_policy(POLICY.replace(", evidence: attack", ""))
    s = Scorer(store=MemoryStore(), hasher=KeyHasher(TEST_SECRET), policy=policy)
    # a warm key calling about 3 times a minute for an hour
    for i in range(180):
        s.score(Event(api_key="sk-a", timestamp=T0 + i * 20, source_ip="81.2.69.160"))
    d = burst(s, T0 + 3600, n=40)
    assert {x.decision for x in d} <= {"allow", "throttle"} and d[-1].decision == "throttle"
    action = next(x.action for x in d if x.decision == "throttle")  # the limit as set
    assert action.type == "throttle" and action.duration_s == 900 and action.until
    assert action.limit_per_min is not None and 5 <= action.limit_per_min <= 12


def test_a_clean_period_forgives_one_step_at_a_time() -> None:
    ladder = EscalationLadder(durations_s=(1800, 7200, 86400, float("inf")),
                              decay_after_s=2 * 86400)
    after_third = BanState(until=T0 + 86400, level=3, last=T0)
    end = T0 + 86400
    assert ladder.next_duration(after_third, end + 3600) == (float("inf"), 4)
    assert ladder.next_duration(after_third, end + 2 * 86400 + 1) == (86400, 3)
    assert ladder.next_duration(after_third, end + 4 * 86400 + 1) == (7200, 2)
    assert ladder.next_duration(after_third, end + 30 * 86400) == (1800, 1)


def test_dry_run_scores_and_explains_but_enforces_nothing() -> None:
    s = scorer(dry_run=True)
    d = burst(s, T0)
    assert {x.decision for x in d} == {"allow"}
    assert d[20].severity == "critical" and d[20].dry_run and not d[20].enforced
    assert d[20].would is not None and d[20].would.decision == "block"
    assert d[20].would.action.type == "temp_ban" and d[20].would.drivers == ["rate_hard"]
    assert d[20].action.type == "alert"
    assert d[10].would is not None and d[10].would.decision == "throttle"
    key_id = KeyHasher(TEST_SECRET).key_id("sk-a")
    assert stored_ban(s, "k", key_id) is None
    later = s.score(Event(api_key="sk-a", timestamp=T0 + 600, source_ip="81.2.69.160"))
    assert later.decision == "allow" and later.reasons == []


def test_allow_listed_keys_and_ranges_are_not_enforced() -> None:
    s = scorer()
    d = burst(s, T0, key="sk-trusted")
    assert {x.decision for x in d} == {"allow"}
    assert d[20].would is not None and d[20].would.decision == "block"
    assert any(r.code == "allow_listed" for r in d[20].reasons)
    # credential stuffing from an allow-listed office range bans nothing
    for i in range(8):
        x = s.score(Event(api_key=f"sk-guess-{i}", timestamp=T0 + i, status=401,
                          source_ip="10.1.2.3"))
    assert x.decision == "allow" and x.would is not None and x.would.decision == "block"
    assert stored_ban(s, "ip", "10.1.2.3") is None


def test_credential_stuffing_bans_the_address_not_the_keys() -> None:
    s = scorer()
    out = [s.score(Event(api_key=f"sk-guess-{i}", timestamp=T0 + i, status=401,
                         source_ip="203.0.113.7")) for i in range(8)]
    assert out[5].decision == "block" and out[5].action.scope == "ip"
    assert out[6].reasons[0].code == "banned_ip"
    assert stored_ban(s, "ip", "203.0.113.7") is not None
    # the same key from another address is fine
    assert s.score(Event(api_key="sk-guess-5", timestamp=T0 + 9,
                         source_ip="198.51.100.4")).decision == "allow"


def _identity_finding(code: str, feature: str) -> Finding:
    reason = Reason(code=code, severity="critical", message=code)
    return Finding(reason=reason, rule_id=code, group="g", scope="key", kind="rule",
                   features=(feature,), evidence="identity")


@pytest.mark.parametrize(("finding", "owner_active", "network_new", "scope"), [
    # the owner is active: the intruder's address, whatever the evidence
    (_identity_finding("odd_hour", "untrusted_hosting_asn_by_event"), True, False, "ip"),
    # the owner is away, the intruder is one address on a network the key never used:
    # its address is enough, and the owner's next morning is not banned
    (_identity_finding("odd_hour", "untrusted_hosting_asn_by_event"), False, True, "ip"),
    # the owner is away, a crowd uses the key (resale): one address's ban stops nothing
    (_identity_finding("sharing", "distinct_countries_by_key_1h"), False, True, "key"),
    # the owner is away, the intruder is on the key's own networks: the key
    (_identity_finding("odd_hour", "untrusted_hosting_asn_by_event"), False, False, "key"),
])
def test_a_ban_lands_on_the_narrowest_scope_that_stops_the_intruder(
        finding: Finding, owner_active: bool, network_new: bool, scope: str) -> None:
    cfg = parse_policy("rules: []\n").responses
    fusion = Fusion(severity="critical", score=0.97, can_block=True,
                    drivers=[finding.reason.code], evidence=["identity"])
    plan = plan_response(fusion, [finding], cfg, bans={}, ladder=EscalationLadder(),
                         entities={"key": "k_1", "ip": "203.0.113.9"}, ts=T0,
                         key=KeyContext(owner_active=owner_active, network_new=network_new))
    assert plan.verdict == "block"
    assert [w.scope for w in plan.writes] == [scope]


def test_a_key_ban_spares_the_owners_established_networks() -> None:
    """An automatic key ban lets through the prefixes the key's normal traffic used
    `spare_established_after` before the incident began (the owner carries on), and
    nothing else; an operator's ban stops every call."""
    s = Scorer(store=MemoryStore(), hasher=KeyHasher(TEST_SECRET), policy=parse_policy(
        POLICY.replace("decay_after: 2d,", "decay_after: 2d, spare_established_after: 6h,")))
    home, recent, stranger = "81.2.69.160", "81.2.70.5", "198.51.100.7"
    for i in range(30):  # the owner's normal traffic from home, learned
        s.score(Event(api_key="sk-a", timestamp=T0 + i * 600, source_ip=home))
    s.score(Event(api_key="sk-a", timestamp=T0 + 8 * HOUR, source_ip=recent))
    s.flush()
    key_id, banned_at = s.hasher.key_id("sk-a"), T0 + 12 * HOUR
    s.store.execute(ban_writes("key", key_id, until=banned_at + 2 * HOUR, level=1,
                               ts=banned_at, reason="leak", incident="identity"))
    at = banned_at + 600

    def call(ip: str, ts: float) -> tuple[str, bool]:
        decision = s.score(Event(api_key="sk-a", timestamp=ts, source_ip=ip))
        return decision.decision, s.check("sk-a", ip, now=ts).allowed

    assert call(home, at) == ("allow", True)
    assert call(stranger, at + 1) == ("block", False)
    assert call(recent, at + 2) == ("block", False)  # learned 4 h before: not established
    s.store.execute(ban_writes("key", key_id, until=banned_at + 2 * HOUR, level=None,
                               ts=at + 3, by="admin", reason="operator"))
    assert call(home, at + 4) == ("block", False)


def test_a_lone_intruder_is_on_a_new_network_while_the_key_is_not_a_crowd() -> None:
    vps = {"untrusted_hosting_asn_by_event": 1.0, "distinct_countries_by_key_1h": 1.0}
    assert network_is_new(vps)
    assert network_is_new({**vps, "distinct_countries_by_key_1h": 2.0})  # owner + intruder
    assert not network_is_new({**vps, "distinct_countries_by_key_1h": 9.0})  # resold
    assert not network_is_new({"untrusted_hosting_asn_by_event": 0.0})  # the key's own
