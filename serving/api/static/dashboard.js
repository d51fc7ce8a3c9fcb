// keywatch operator dashboard. Vanilla JS, no build step.
//
// Safety rule: every string that comes from the API (key ids, reason codes and messages,
// ban reasons, addresses, endpoints) is put into the page as a text node or an attribute
// value set through the DOM; nothing is ever parsed as HTML. The server's CSP forbids
// inline scripts as a second line of defence.
//
// The admin token is read from the input box or from `#token=...` in the URL fragment
// (fragments are never sent to the server), kept in sessionStorage for this tab only,
// and sent as `Authorization: Bearer`.
"use strict";

(() => {
  const TOKEN_KEY = "keywatch.adminToken";
  const REFRESH_MS = 10000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SEVERITIES = ["none", "low", "medium", "high", "critical"];
  const VERDICTS = ["allow", "throttle", "block"];

  const state = {
    selectedKey: null,
    keyPinned: false,
    bucket: 300,
    bans: [],
    limits: [],
    timer: null,
    loading: false,
  };

  // ---- DOM helpers (text only) -------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    setProps(node, props);
    appendAll(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    appendAll(node, children);
    return node;
  }

  function setProps(node, props) {
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, String(v));
    }
  }

  function appendAll(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function cls(prefix, value, allowed) {
    // class names built from API values are checked against a fixed list
    return allowed.includes(value) ? `${prefix}-${value}` : "";
  }

  function sevBadge(sev) {
    return el("span", { class: `badge sev ${cls("sev", sev, SEVERITIES)}`, text: sev || "?" });
  }

  function verdictBadge(v) {
    return el("span", { class: `badge verdict ${cls("v", v, VERDICTS)}`, text: v || "?" });
  }

  function codeChip(reason) {
    const sev = reason.severity || "";
    return el("span", {
      class: `code ${cls("sev", sev, SEVERITIES)}`,
      title: reason.message ? `${reason.message} (${sev})` : sev,
      text: reason.code,
    });
  }

  function shortKey(keyId) {
    return keyId && keyId.length > 14 ? `${keyId.slice(0, 12)}…` : keyId || "";
  }

  function fmtTime(iso, withDate) {
    if (!iso) return "";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const s = d.toISOString();
    return withDate ? `${s.slice(5, 10)} ${s.slice(11, 19)}` : s.slice(11, 19);
  }

  function fmtNum(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  function empty(text, colspan) {
    if (colspan) return el("tr", {}, el("td", { colspan, class: "empty", text }));
    return el("div", { class: "empty", text });
  }

  // ---- token and status -------------------------------------------------------------
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function readFragment() {
    const frag = new URLSearchParams(location.hash.slice(1));
    const t = frag.get("token");
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    const k = frag.get("key");
    if (k) {
      state.selectedKey = k;
      state.keyPinned = true;
    }
    if (location.hash) {
      // keep the token out of the address bar, history and screenshots
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function setStatus(text, isError) {
    const node = $("status");
    node.textContent = text;
    node.classList.toggle("error", Boolean(isError));
  }

  function notice(text) {
    const node = $("notice");
    if (!text) {
      node.hidden = true;
      clear(node);
      return;
    }
    node.hidden = false;
    node.textContent = text;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method: opts.method || "GET",
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      cache: "no-store",
      credentials: "omit",
    });
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const msg = data && typeof data.error === "string" ? data.error : `HTTP ${resp.status}`;
      throw new ApiError(resp.status, msg);
    }
    return data;
  }

  // ---- renderers --------------------------------------------------------------------
  function renderSummary(stats, bans, risky) {
    const t = (stats && stats.totals) || { events: 0, decisions: {}, severities: {} };
    const sev = t.severities || {};
    const alertWorthy = (sev.medium || 0) + (sev.high || 0) + (sev.critical || 0);
    const windowText = stats && stats.buckets && stats.buckets.length
      ? `since ${fmtTime(stats.buckets[0].start, true)}`
      : "no events yet";
    const tiles = [
      ["t-events", "Events", fmtNum(t.events), windowText],
      ["t-block", "Blocked", fmtNum((t.decisions || {}).block), "verdict block"],
      ["t-throttle", "Throttled", fmtNum((t.decisions || {}).throttle), "verdict throttle"],
      ["t-alert", "Medium or worse", fmtNum(alertWorthy), "decisions by severity"],
      ["t-ban", "Active bans", fmtNum(bans.length), "keys and addresses"],
      ["t-alert", "Keys with alerts", fmtNum(risky.length), "top of the risk list"],
    ];
    const box = clear($("summary"));
    for (const [c, label, value, sub] of tiles) {
      box.append(el("div", { class: `tile ${c}` },
        el("div", { class: "label", text: label }),
        el("div", { class: "value", text: value }),
        el("div", { class: "sub", text: sub })));
    }
  }

  function niceMax(v) {
    if (v <= 5) return 5;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function renderChart(stats) {
    const box = clear($("chart"));
    const buckets = (stats && stats.buckets) || [];
    const W = 860;
    const H = 260;
    const pad = { l: 44, r: 10, t: 10, b: 26 };
    const root = svg("svg", {
      id: "decisions-chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
      role: "img", "aria-label": "Decisions per time bucket by verdict",
    });
    box.append(root);
    if (!buckets.length) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no decisions yet"));
      return;
    }
    const maxTotal = niceMax(Math.max(...buckets.map((b) => b.total), 1));
    const plotW = W - pad.l - pad.r;
    const plotH = H - pad.t - pad.b;
    const step = plotW / buckets.length;
    const barW = Math.max(1, step * 0.78);
    const y = (v) => pad.t + plotH - (v / maxTotal) * plotH;

    const grid = svg("g", { class: "axis" });
    for (let i = 0; i <= 4; i += 1) {
      const v = (maxTotal * i) / 4;
      grid.append(svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "grid-line" }));
      grid.append(svg("text", { x: pad.l - 6, y: y(v) + 3, "text-anchor": "end" }, fmtNum(v)));
    }
    root.append(grid);

    const labelEvery = Math.max(1, Math.ceil(buckets.length / 10));
    buckets.forEach((b, i) => {
      const x = pad.l + i * step + (step - barW) / 2;
      const g = svg("g", { class: "bucket-group" });
      let acc = 0;
      for (const v of VERDICTS) {
        const n = (b.decisions || {})[v] || 0;
        if (!n) continue;
        const top = y(acc + n);
        g.append(svg("rect", {
          class: `bar bar-${v}`, x: x.toFixed(2), y: top.toFixed(2), width: barW.toFixed(2),
          height: Math.max(0.5, y(acc) - top).toFixed(2),
        }));
        acc += n;
      }
      const d = b.decisions || {};
      g.append(svg("title", {},
        `${fmtTime(b.start, true)} UTC: ${fmtNum(b.total)} decisions, `
        + `${fmtNum(d.block)} block, ${fmtNum(d.throttle)} throttle, ${fmtNum(d.allow)} allow`));
      root.append(g);
      if (i % labelEvery === 0) {
        root.append(svg("text", {
          x: (pad.l + i * step + step / 2).toFixed(2), y: H - 8, "text-anchor": "middle",
        }, fmtTime(b.start).slice(0, 5)));
      }
    });

    const legend = clear($("chart-legend"));
    const totals = stats.totals.decisions || {};
    for (const v of VERDICTS) {
      legend.append(el("span", {}, el("span", { class: `swatch ${v}` }),
        `${v} ${fmtNum(totals[v])}`));
    }
    legend.append(el("span", { text: `· ${stats.bucket_s / 60} min buckets, event time (UTC)` }));
  }

  function keyButton(keyId) {
    return el("button", {
      type: "button", class: "link key-id", title: keyId, "data-key": keyId,
      onclick: (ev) => { ev.stopPropagation(); selectKey(keyId, true); },
    }, shortKey(keyId));
  }

  function renderRisky(keys) {
    const body = clear($("risky-keys").tBodies[0]);
    if (!keys.length) {
      body.append(empty("No alerts yet.", 5));
      return;
    }
    for (const k of keys) {
      const codes = Object.entries(k.codes || {}).slice(0, 3);
      body.append(el("tr", {
        class: `key-row${k.key_id === state.selectedKey ? " selected" : ""}`,
        "data-key": k.key_id,
        onclick: () => selectKey(k.key_id, true),
      },
      el("td", {}, keyButton(k.key_id)),
      el("td", {}, sevBadge(k.max_severity), " ", verdictBadge(k.worst_decision)),
      el("td", { class: "num", text: fmtNum(k.alerts) }),
      el("td", { class: "num", text: fmtNum(k.decisions) }),
      el("td", {}, codes.map(([code, n]) => el("span", {
        class: "code", title: `${n} decisions`, text: `${code} ×${n}`,
      })))));
    }
  }

  function renderAlerts(alerts) {
    const body = clear($("alerts").tBodies[0]);
    $("alerts-count").textContent = `newest first · ${alerts.length} shown`;
    if (!alerts.length) {
      body.append(empty("No alerts yet.", 8));
      return;
    }
    for (const a of alerts) {
      const reasons = Array.isArray(a.reasons) && a.reasons.length
        ? a.reasons : [{ code: a.code, severity: a.severity, message: a.title }];
      body.append(el("tr", { class: "alert-row", "data-alert": a.alert_id },
        el("td", { class: "time", text: fmtTime(a.last_seen, true) }),
        el("td", {}, sevBadge(a.severity)),
        el("td", {}, verdictBadge(a.decision)),
        el("td", {}, keyButton(a.key_id)),
        el("td", { class: "reasons" },
          reasons.map(codeChip),
          el("span", { class: "msg", text: a.title || "" })),
        el("td", { class: "num", text: fmtNum(a.count) }),
        el("td", { class: "mono", text: a.source_ip || "" }),
        el("td", {}, el("span", {
          class: `badge ${cls("st", a.status, ["open", "confirmed", "false_positive"])}`,
          text: (a.status || "").replace("_", " "),
        }))));
    }
  }

  function renderBans(bans) {
    const body = clear($("bans").tBodies[0]);
    $("bans-count").textContent = bans.length ? `${bans.length} active` : "";
    if (!bans.length) {
      body.append(empty("No active bans.", 3));
      return;
    }
    for (const b of bans) {
      const target = b.scope === "key" ? keyButton(b.target)
        : el("span", { class: "mono", text: b.target });
      body.append(el("tr", { class: "ban-row", "data-scope": b.scope, "data-target": b.target },
        el("td", { class: "ban-target" },
          el("span", { class: "badge sev-high", text: b.scope }), " ", target,
          el("span", { class: "msg ban-reason", text: b.reason || "" })),
        el("td", { class: "time" }, b.permanent ? "permanent" : fmtTime(b.until, true),
          el("span", { class: "msg", text: `offence ${b.offences || 1} · by ${b.by || "?"}` })),
        el("td", { class: "action" }, el("button", {
          type: "button", class: "unban", "data-scope": b.scope, "data-target": b.target,
          onclick: (ev) => unban(b, ev.currentTarget),
        }, "Unban"))));
    }
  }

  function renderLimits(limits) {
    const body = clear($("limits").tBodies[0]);
    $("limits-count").textContent = limits.length ? `${limits.length} active` : "";
    if (!limits.length) {
      body.append(empty("No active limits.", 3));
      return;
    }
    for (const l of limits) {
      const target = l.scope === "key" ? keyButton(l.target)
        : el("span", { class: "mono", text: l.target });
      body.append(el("tr", { class: "limit-row", "data-scope": l.scope, "data-target": l.target },
        el("td", { class: "ban-target" },
          el("span", { class: "badge sev-medium", text: l.scope }), " ", target,
          el("span", { class: "msg ban-reason", text: l.reason || "" })),
        el("td", { class: "time" }, `${fmtNum(l.limit_per_min)}/min until ${fmtTime(l.until, true)}`,
          el("span", { class: "msg", text: `burst ${fmtNum(l.burst)} · by ${l.by || "?"}` })),
        el("td", { class: "action" }, el("button", {
          type: "button", class: "unthrottle", "data-scope": l.scope, "data-target": l.target,
          onclick: (ev) => unthrottle(l, ev.currentTarget),
        }, "Lift"))));
    }
  }

  async function unthrottle(limit, button) {
    if (!window.confirm(`Lift the limit on ${limit.scope} ${limit.target}?`)) return;
    button.disabled = true;
    const body = limit.scope === "key"
      ? { key: limit.target, reason: "lifted from the dashboard" }
      : { ip: limit.target, reason: "lifted from the dashboard" };
    try {
      await api("/admin/unthrottle", { method: "POST", body });
      setStatus(`limit lifted on ${limit.scope} ${limit.target}`);
      await refresh();
    } catch (err) {
      button.disabled = false;
      handleError(err);
    }
  }

  function renderKey(report) {
    const title = $("key-title");
    const summary = clear($("key-summary"));
    const list = clear($("key-timeline"));
    if (!report) {
      title.textContent = "";
      list.append(el("li", { class: "empty", text: "Click a key to see its recent decisions." }));
      return;
    }
    title.textContent = report.key_id;
    const base = report.baseline || {};
    const ban = report.ban
      || state.bans.find((b) => b.scope === "key" && b.target === report.key_id);
    const item = (label, value) => el("span", {}, `${label} `, el("b", { text: value }));
    if (ban) {
      summary.append(el("span", {
        class: "banned",
        text: ban.permanent ? "banned permanently" : `banned until ${fmtTime(ban.until, true)}`,
      }));
    }
    if (report.limit) {
      summary.append(el("span", {
        class: "banned",
        text: `limited to ${fmtNum(report.limit.limit_per_min)}/min until ${fmtTime(report.limit.until, true)}`,
      }));
    }
    if (report.seen) {
      const decisions = base.decisions || {};
      summary.append(
        item("events", fmtNum(base.events)),
        item("blocked", fmtNum(decisions.block)),
        item("throttled", fmtNum(decisions.throttle)),
        item("tokens/call", fmtNum(Math.round(base.tokens_mean || 0))),
        item("failures", `${((base.failure_ratio || 0) * 100).toFixed(1)}%`),
        item("alerts", fmtNum(report.alerts_recorded)),
        item("addresses", fmtNum((base.recent_source_ips || []).length)),
        item("first seen", fmtTime(base.first_seen, true)),
      );
    } else {
      summary.append(el("span", { text: "not seen by this replica since it started" }));
    }
    const recent = report.recent_decisions || [];
    if (!recent.length) {
      list.append(el("li", { class: "empty", text: "No noteworthy decisions for this key." }));
      return;
    }
    for (const d of recent) {
      list.append(el("li", { class: `decision ${cls("sev", d.severity, SEVERITIES)}` },
        el("div", { class: "line1" },
          el("span", { class: "when", text: fmtTime(d.event_time, true) }),
          verdictBadge(d.decision), sevBadge(d.severity),
          el("span", { class: "where", text: `score ${Number(d.score || 0).toFixed(2)}` }),
          el("span", { class: "where mono", text: d.source_ip || "" }),
          el("span", { class: "where mono", text: `${d.endpoint || ""} → ${d.status ?? ""}` }),
          d.action && d.action.type && d.action.type !== "none"
            ? el("span", { class: "code", text: d.action.type }) : null),
        el("div", { class: "reasons" }, (d.reasons || []).map((r) => el("span", { class: "reason" },
          codeChip(r), el("span", { class: "where", text: r.message || "" }))))));
    }
  }

  // ---- actions ----------------------------------------------------------------------
  async function selectKey(keyId, pinned) {
    state.selectedKey = keyId;
    if (pinned) state.keyPinned = true;
    for (const row of document.querySelectorAll("#risky-keys tr.key-row")) {
      row.classList.toggle("selected", row.getAttribute("data-key") === keyId);
    }
    try {
      const report = await api(`/v1/keys/${encodeURIComponent(keyId)}`);
      if (state.selectedKey === keyId) renderKey(report);
    } catch (err) {
      handleError(err);
    }
  }

  async function unban(ban, button) {
    if (!window.confirm(`Lift the ban on ${ban.scope} ${ban.target}?`)) return;
    button.disabled = true;
    const body = ban.scope === "key"
      ? { key: ban.target, reason: "unbanned from the dashboard" }
      : { ip: ban.target, reason: "unbanned from the dashboard" };
    try {
      await api("/admin/unban", { method: "POST", body });
      setStatus(`unbanned ${ban.scope} ${ban.target}`);
      await refresh();
    } catch (err) {
      button.disabled = false;
      handleError(err);
    }
  }

  function handleError(err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 503)) {
      notice(err.status === 401
        ? "The admin token was refused. Enter the KEYWATCH_ADMIN_TOKEN above."
        : err.message);
      setStatus("not connected", true);
      document.body.setAttribute("data-state", "unauthorized");
    } else {
      setStatus(`error: ${err.message || err}`, true);
    }
  }

  async function refresh() {
    if (state.loading) return;
    if (!token()) {
      notice("Enter the admin token (KEYWATCH_ADMIN_TOKEN) above to load data.");
      setStatus("not connected", true);
      document.body.setAttribute("data-state", "no-token");
      renderKey(null);
      return;
    }
    state.loading = true;
    try {
      const [stats, risky, alerts, bans, limits] = await Promise.all([
        api(`/v1/stats/decisions?bucket=${state.bucket}&buckets=60`),
        api("/v1/stats/keys?limit=10"),
        api("/v1/alerts?limit=40"),
        api("/admin/bans?limit=200"),
        api("/admin/limits?limit=200"),
      ]);
      notice("");
      state.bans = bans.bans || [];
      state.limits = limits.limits || [];
      renderLimits(state.limits);
      renderSummary(stats, state.bans, risky.keys || []);
      renderChart(stats);
      renderRisky(risky.keys || []);
      renderAlerts(alerts.alerts || []);
      renderBans(state.bans);
      if (!state.keyPinned && risky.keys && risky.keys.length) {
        state.selectedKey = risky.keys[0].key_id;
      }
      if (state.selectedKey) await selectKey(state.selectedKey, false);
      else renderKey(null);
      const end = stats.end ? ` · events up to ${fmtTime(stats.end, true)} UTC` : "";
      setStatus(`connected · refreshed ${new Date().toISOString().slice(11, 19)} UTC${end}`);
      document.body.setAttribute("data-state", "loaded");
    } catch (err) {
      handleError(err);
    } finally {
      state.loading = false;
    }
  }

  function schedule() {
    if (state.timer) clearInterval(state.timer);
    state.timer = $("auto-refresh").checked ? setInterval(refresh, REFRESH_MS) : null;
  }

  function init() {
    readFragment();
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token-input").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      $("token-input").value = "";
      refresh();
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      refresh();
    });
    $("bucket-select").addEventListener("change", (ev) => {
      state.bucket = Number(ev.target.value) || 300;
      refresh();
    });
    $("auto-refresh").addEventListener("change", schedule);
    state.bucket = Number($("bucket-select").value) || 300;
    refresh();
    schedule();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
