// The Lumen admin console: polls the admin API (the same JSON `lumen status` and `lumen usage`
// read) and draws the last minutes of traffic with uPlot when it is installed. No framework,
// no build step, nothing from another host.
"use strict";

const REFRESH_MS = 2000;
const KEEP_MS = 15 * 60 * 1000;

const state = {
  points: [],     // /admin/timeseries points, oldest first
  lastT: 0,       // newest point's time (Unix ms)
  charts: {},     // name -> uPlot
  refreshes: 0,
  failures: 0,
};
// Read by tests and handy in the browser's console.
window.lumenConsole = state;

async function getJSON(path) {
  const r = await fetch(path, { credentials: "same-origin", headers: { accept: "application/json" } });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fillTable(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }));
}

function fmt(v, digits, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return v.toFixed(digits) + (unit || "");
}

function fmtInt(v) {
  return v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US");
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

// ---- charts ----

const CHARTS = {
  rps: { series: [["requests/s", "#2356c7", (p) => p.requests_per_s]] },
  errors: { series: [["5xx %", "#c62828", (p) => pct(p.error_ratio)]] },
  latency: { series: [["p50", "#2356c7", (p) => p.p50_ms], ["p99", "#b35900", (p) => p.p99_ms]] },
  ttft: { series: [["p50", "#1a7f37", (p) => p.ttft_p50_ms], ["p99", "#8e44ad", (p) => p.ttft_p99_ms]] },
  cache: { series: [["hit %", "#1a7f37", (p) => pct(p.cache_hit_ratio)]] },
  limited: { series: [["rejections/s", "#c62828", (p) => p.rate_limited_per_s]] },
};

function pct(ratio) {
  return ratio === null || ratio === undefined ? null : ratio * 100;
}

function chartData(name) {
  const spec = CHARTS[name];
  const data = [state.points.map((p) => p.t / 1000)];
  for (const [, , get] of spec.series) data.push(state.points.map((p) => (get(p) ?? null)));
  return data;
}

function chartWidth(id) {
  const box = document.getElementById(id);
  return Math.max(280, box.clientWidth || box.parentElement.clientWidth - 16);
}

function drawCharts() {
  if (typeof window.uPlot !== "function") return;
  for (const name of Object.keys(CHARTS)) {
    const id = "chart-" + name;
    const data = chartData(name);
    let chart = state.charts[name];
    if (!chart) {
      const opts = {
        width: chartWidth(id),
        height: 180,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1)] } },
        legend: { live: false },
        series: [{}].concat(CHARTS[name].series.map(([label, stroke]) => ({
          label, stroke, width: 2, spanGaps: false, points: { show: true, size: 4 },
        }))),
      };
      chart = new window.uPlot(opts, data, document.getElementById(id));
      state.charts[name] = chart;
    } else {
      chart.setData(data);
    }
    document.getElementById(id).dataset.points = String(data[0].length);
  }
}

window.addEventListener("resize", () => {
  for (const [name, chart] of Object.entries(state.charts)) {
    chart.setSize({ width: chartWidth("chart-" + name), height: 180 });
  }
});

// ---- panels ----

// The newest value of a field within the last 30 s: an idle last interval shows the latest
// latency seen rather than a blank.
function recent(get) {
  for (let i = state.points.length - 1; i >= 0 && i >= state.points.length - 15; i--) {
    const v = get(state.points[i]);
    if (v !== null && v !== undefined) return v;
  }
  return null;
}

function renderNow() {
  const last = state.points[state.points.length - 1];
  if (!last) return;
  document.getElementById("now-rps").textContent = fmt(last.requests_per_s, 1);
  document.getElementById("now-errors").textContent = fmt(pct(recent((p) => p.error_ratio)), 1, " %");
  document.getElementById("now-latency").textContent =
    fmt(recent((p) => p.p50_ms), 1) + " / " + fmt(recent((p) => p.p99_ms), 1) + " ms";
  document.getElementById("now-ttft").textContent = fmt(recent((p) => p.ttft_p50_ms), 1, " ms");
  document.getElementById("now-cache").textContent = fmt(pct(recent((p) => p.cache_hit_ratio)), 0, " %");
  document.getElementById("now-limited").textContent = fmt(last.rate_limited_per_s, 1);
}

const CIRCUIT_RANK = { closed: 0, half_open: 1, open: 2 };

function renderProviders(report) {
  fillTable("providers", report.providers.map((p) => {
    const worst = p.models.reduce((w, m) => (CIRCUIT_RANK[m.circuit.state] > CIRCUIT_RANK[w] ? m.circuit.state : w), "closed");
    const latencies = p.models.map((m) => m.latency_ewma_ms).filter((v) => v !== null);
    const latency = latencies.length ? Math.min(...latencies) : null;
    const quota = [];
    if (p.quota.requests_left !== null) quota.push(fmtInt(p.quota.requests_left) + " req");
    if (p.quota.tokens_left !== null) quota.push(fmtInt(p.quota.tokens_left) + " tok");
    const error = p.last_error ? p.last_error.message + " (" + ago(p.last_error.at_unix_ms) + ")" : "";
    return [
      el("td", p.name),
      el("td", p.probe.enabled ? p.probe.state : "not probed", "state-" + p.probe.state),
      el("td", worst, "state-" + worst),
      el("td", fmt(latency, 1, " ms"), "num"),
      el("td", p.in_flight + (p.capacity !== null ? " / " + p.capacity : ""), "num"),
      el("td", quota.length ? quota.join(", ") : "no quota"),
      el("td", fmtInt(p.usage_today.requests), "num"),
      el("td", error, "error"),
    ];
  }));
}

function topBy(rows, field) {
  const sums = new Map();
  for (const r of rows) {
    const s = sums.get(r[field]) || { tokens: 0, requests: 0 };
    s.tokens += r.prompt_tokens + r.completion_tokens;
    s.requests += r.requests;
    sums.set(r[field], s);
  }
  return [...sums.entries()].sort((a, b) => b[1].tokens - a[1].tokens || b[1].requests - a[1].requests).slice(0, 10)
    .map(([name, s]) => [el("td", name), el("td", fmtInt(s.tokens), "num"), el("td", fmtInt(s.requests), "num")]);
}

function renderUsage(report) {
  fillTable("top-keys", topBy(report.rows, "key"));
  fillTable("top-models", topBy(report.rows, "model"));
}

function renderRoutes(report) {
  fillTable("routes", report.routes.map((r) => [
    el("td", r.model),
    el("td", r.strategy),
    el("td", r.targets.map((t) => t.provider + ":" + t.model + (r.strategy === "weighted" ? " ×" + t.weight : "")).join(", ")),
    el("td", r.cache ? "yes" : "no"),
  ]));
}

function renderConfig(cfg, health) {
  const reload = cfg.last_reload
    ? " · last reload " + cfg.last_reload.result + " " + ago(cfg.last_reload.at_unix_ms)
    : "";
  document.getElementById("config").textContent =
    "config " + cfg.hash.slice(0, 12) + " · " + cfg.routes + " routes, " + cfg.providers + " providers · loaded " + ago(cfg.loaded_at_unix_ms) + reload;
  const badge = document.getElementById("state");
  const unhealthy = health.providers.filter((p) => p.probe.state === "unhealthy").length;
  const open = health.providers.filter((p) => p.models.some((m) => m.circuit.state === "open")).length;
  badge.textContent = unhealthy || open ? unhealthy + " unhealthy, " + open + " with open circuits" : "all providers up";
  badge.className = "badge " + (unhealthy || open ? (unhealthy === health.providers.length ? "bad" : "degraded") : "ok");
}

// ---- refresh loop ----

async function refresh() {
  try {
    const [series, providers, usage, cfg] = await Promise.all([
      getJSON("/admin/timeseries?since=" + state.lastT),
      getJSON("/admin/providers"),
      getJSON("/admin/usage"),
      getJSON("/admin/config"),
    ]);
    if (series.points.length) {
      state.points.push(...series.points);
      state.lastT = series.points[series.points.length - 1].t;
      const oldest = state.lastT - KEEP_MS;
      while (state.points.length && state.points[0].t < oldest) state.points.shift();
    }
    if (state.refreshes % 15 === 0) renderRoutes(await getJSON("/admin/routes"));
    renderNow();
    drawCharts();
    renderProviders(providers);
    renderUsage(usage);
    renderConfig(cfg, providers);
    state.refreshes += 1;
    document.getElementById("unreachable").hidden = true;
  } catch (e) {
    state.failures += 1;
    // A fetch that failed means the API does not answer; anything else is this page's bug.
    const unreachable = e instanceof TypeError && String(e.message).includes("fetch");
    const notice = document.getElementById("unreachable");
    notice.textContent = unreachable
      ? "The admin API does not answer: is the gateway running?"
      : "The console could not show the admin API's answer: " + e.message;
    notice.hidden = false;
    console.warn("lumen console refresh:", e);
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
