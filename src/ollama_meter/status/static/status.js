/* ollama-meter status page: polls status.json (docs/status.md, version 1) every 2 s and
 * draws it. Every string of the data goes into the page as text (textContent, text nodes,
 * attribute values), never as markup: model names, key names and error strings come from
 * clients and upstreams. An admin key, when the proxy asks for one, lives in this tab's
 * sessionStorage and travels only in the Authorization header.
 */
(function () {
  "use strict";

  const KNOWN_VERSION = 1;
  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 8000;
  const STALE_MS = 7000; // no fresh data for this long: say so
  const KEY_STORE = "ollama-meter.status.key";
  const DASH = "—";

  const $ = (id) => document.getElementById(id);

  // ---- DOM building: strings always become text nodes ----------------------------------

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function text(id, value) {
    $(id).textContent = value;
  }

  // ---- Values from the data: narrowed before use ----------------------------------------

  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const str = (v) => (typeof v === "string" ? v : v === null || v === undefined ? null : String(v));
  const list = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : null);

  const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
  const whole = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

  function fmtRate(v) {
    v = num(v);
    if (v === null) return DASH;
    if (v === 0) return "0";
    if (Math.abs(v) < 10) return v.toFixed(2);
    if (Math.abs(v) < 100) return v.toFixed(1);
    return whole.format(v);
  }

  function fmtSeconds(v) {
    v = num(v);
    if (v === null) return DASH;
    if (v < 1) return `${Math.round(v * 1000)} ms`;
    if (v < 10) return `${v.toFixed(2)} s`;
    return `${v.toFixed(1)} s`;
  }

  function fmtCount(v) {
    v = num(v);
    return v === null ? DASH : compact.format(v);
  }

  function fmtBytes(v) {
    v = num(v);
    if (v === null) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
  }

  function fmtDuration(seconds) {
    const s = num(seconds);
    if (s === null) return DASH;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    const pair = (big, bigUnit, small, smallUnit) => (small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`);
    if (s < 86400) return pair(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "min");
    return pair(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
  }

  // When a model unloads, from the proxy's clock (generated_at), not the browser's.
  function fmtUntil(at, now) {
    at = num(at);
    if (at === null || now === null) return DASH;
    const d = at - now;
    if (d <= 0) return "unloading";
    if (d > 365 * 86400) return "stays loaded";
    if (d < 60) return `in ${Math.round(d)} s`;
    if (d < 3600) return `in ${Math.round(d / 60)} min`;
    if (d < 2 * 86400) return `in ${Math.round(d / 3600)} h`;
    return `in ${Math.round(d / 86400)} d`;
  }

  function unloads(at, now) {
    const when = fmtUntil(at, now);
    if (when === DASH) return "no unload time";
    return when === "stays loaded" || when === "unloading" ? when : `unloads ${when}`;
  }

  function fmtAgo(at, now) {
    at = num(at);
    if (at === null || now === null) return DASH;
    const d = Math.max(0, now - at);
    return d < 1 ? "just now" : `${fmtDuration(d)} ago`;
  }

  function fmtClock(at) {
    at = num(at);
    if (at === null) return DASH;
    const date = new Date(at * 1000);
    const old = Date.now() - date.getTime() > 20 * 3600 * 1000;
    return old ? date.toLocaleString() : date.toLocaleTimeString();
  }

  function fmtTick(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  // A UTC day: the ledger's "today" starts at 00:00 UTC.
  function fmtUtcDay(at) {
    at = num(at);
    return at === null ? DASH : `${new Date(at * 1000).toISOString().slice(0, 10)} 00:00 UTC`;
  }

  function fmtValue(v) {
    if (v === null || v === undefined) return "none";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  // ---- The admin key ----------------------------------------------------------------------

  const keyStore = {
    memory: null, // when sessionStorage is not allowed (some privacy settings)
    get() {
      try {
        return sessionStorage.getItem(KEY_STORE) ?? this.memory;
      } catch (_) {
        return this.memory;
      }
    },
    set(value) {
      this.memory = value;
      try {
        sessionStorage.setItem(KEY_STORE, value);
      } catch (_) {
        /* kept in memory only */
      }
    },
    clear() {
      this.memory = null;
      try {
        sessionStorage.removeItem(KEY_STORE);
      } catch (_) {
        /* nothing stored */
      }
    },
  };

  // ---- Polling: one fetch at a time, the next 2 s after the last one ended --------------

  const state = {
    data: null, // the last data shown
    okAt: 0, // Date.now() when it came
    conn: "loading",
    problem: "",
    timer: null,
    inFlight: false,
    polls: 0,
    waitingForKey: false,
    sortKey: null, // null: the proxy's order (busiest first)
    sortDir: "desc",
  };

  function schedule(ms) {
    if (state.timer === null && !state.waitingForKey) state.timer = setTimeout(poll, ms);
  }

  function pollNow() {
    if (state.timer !== null) {
      clearTimeout(state.timer);
      state.timer = null;
    }
    if (!state.inFlight) poll();
  }

  async function poll() {
    state.timer = null;
    if (state.inFlight) return;
    state.inFlight = true;
    document.documentElement.dataset.fetching = "yes";
    try {
      await fetchOnce();
    } finally {
      state.inFlight = false;
      schedule(POLL_MS);
      // What a test reads to know where the page is: fetches done, one under way.
      state.polls += 1;
      document.documentElement.dataset.polls = String(state.polls);
      document.documentElement.dataset.fetching = "no";
    }
  }

  async function readJson(response) {
    try {
      return JSON.parse(await response.text());
    } catch (_) {
      return null;
    }
  }

  async function fetchOnce() {
    const key = keyStore.get();
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const controller = new AbortController();
    const deadline = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    let response;
    let body;
    try {
      response = await fetch("status.json", {
        headers,
        cache: "no-store",
        credentials: "same-origin",
        signal: controller.signal,
      });
      body = await readJson(response);
    } catch (error) {
      const slow = error instanceof DOMException && error.name === "AbortError";
      unreachable(slow ? `the proxy did not answer within ${FETCH_TIMEOUT_MS / 1000} s` : "cannot reach the proxy");
      return;
    } finally {
      clearTimeout(deadline);
    }
    const message = str(obj(body)?.error);
    if (response.status === 401 || response.status === 403) {
      askForKey(Boolean(key), message);
    } else if (!response.ok) {
      unreachable(`the proxy answered HTTP ${response.status}${message ? `: ${message}` : ""}`);
    } else if (obj(body) === null) {
      unreachable("the proxy's answer is not status data");
    } else {
      accept(body);
    }
  }

  function setConnection(conn, problem) {
    state.conn = conn;
    state.problem = problem || "";
    refreshConnection();
  }

  // Runs every second too, so that "stale" shows while a fetch hangs.
  function refreshConnection() {
    const node = $("connection");
    const since = state.data ? Math.round((Date.now() - state.okAt) / 1000) : null;
    let conn = state.conn;
    let label;
    if (conn === "live" && since !== null && since * 1000 > STALE_MS) conn = "stale";
    if (conn === "live") label = `live · updated ${new Date(state.okAt).toLocaleTimeString()}`;
    else if (conn === "stale") label = `stale: no new data for ${since} s`;
    else if (conn === "unreachable")
      label = state.data
        ? `${state.problem}; showing data from ${since} s ago`
        : `${state.problem}`;
    else if (conn === "key") label = "needs an admin key";
    else if (conn === "version") label = "unknown data version";
    else label = "loading…";
    node.dataset.state = conn;
    node.textContent = label;
    $("content").classList.toggle("stale", conn === "stale" || conn === "unreachable");
  }

  function unreachable(reason) {
    setConnection("unreachable", reason);
  }

  function forget() {
    state.data = null;
    $("content").hidden = true;
    destroyCharts();
  }

  function askForKey(sent, message) {
    state.waitingForKey = true;
    if (sent) keyStore.clear(); // a refused key is not sent again
    forget();
    const note = $("key-message");
    note.classList.toggle("refused", sent);
    note.textContent = sent
      ? `Key refused${message ? `: ${message}` : ""}. Enter an admin key.`
      : "Access control is on: the status needs an admin key.";
    $("key-form").hidden = false;
    $("forget-key").hidden = true;
    setConnection("key");
    $("key-input").focus();
  }

  function onKeySubmit(event) {
    event.preventDefault();
    const input = $("key-input");
    const key = input.value.trim();
    if (!key) return;
    input.value = "";
    keyStore.set(key);
    $("key-form").hidden = true;
    state.waitingForKey = false;
    setConnection("loading");
    pollNow();
  }

  function onForgetKey() {
    keyStore.clear();
    $("forget-key").hidden = true;
    forget();
    setConnection("loading");
    pollNow();
  }

  function accept(data) {
    const banner = $("banner");
    const version = data.version;
    if (!Number.isInteger(version) || version !== KNOWN_VERSION) {
      forget();
      banner.textContent =
        Number.isInteger(version) && version > KNOWN_VERSION
          ? `This page knows version ${KNOWN_VERSION} of status.json; the proxy sent version ${version}. ` +
            "Reload the page (an old copy may be cached), or use the page of the same ollama-meter release."
          : `status.json has a version this page does not know (${fmtValue(version)}).`;
      banner.hidden = false;
      setConnection("version");
      return;
    }
    banner.hidden = true;
    $("key-form").hidden = true;
    $("forget-key").hidden = !keyStore.get();
    state.data = data;
    state.okAt = Date.now();
    $("content").hidden = false;
    setConnection("live");
    render(data);
  }

  // ---- Rendering -------------------------------------------------------------------------

  function render(data) {
    const now = num(data.generated_at);
    renderSummary(data);
    renderFleet(obj(data.fleet) || {}, now);
    renderModels(obj(data.models) || {});
    renderKeys(obj(data.keys) || {});
    renderProblems(list(data.problems), now);
    renderProxy(data);
  }

  function renderSummary(data) {
    const meter = obj(data.meter) || {};
    const parts = [`v${fmtValue(meter.version)}`, `up ${fmtDuration(meter.uptime_seconds)}`];
    if (meter.mode) parts.push(str(meter.mode) === "fleet" ? "fleet" : "one upstream");
    const on = ["access_control", "limits", "ledger"].filter((name) => meter[name] === true);
    if (on.length) parts.push(on.map((name) => name.replace("_", " ")).join(", ") + " on");
    text("summary", parts.join(" · "));
  }

  function renderFleet(fleet, now) {
    const queue = obj(fleet.queue) || {};
    const upstreams = list(fleet.upstreams);
    const up = upstreams.filter((u) => u && u.up === true).length;
    const queueText =
      num(queue.max) === null
        ? "no queue (no upstream is gated)"
        : `queue ${fmtCount(queue.depth)} of ${fmtCount(queue.max)}` +
          (num(queue.max_wait_seconds) !== null ? `, waits up to ${fmtSeconds(queue.max_wait_seconds)}` : "");
    text("queue", `${up} of ${upstreams.length} upstreams up · ${queueText}`);
    $("upstreams").replaceChildren(...upstreams.map((u) => upstreamCard(obj(u) || {}, now)));
  }

  function upstreamCard(u, now) {
    const isUp = u.up === true;
    const breaker = str(u.breaker);
    const slots = num(u.slots);
    const head = h(
      "div",
      { class: "upstream-head" },
      h("span", { class: "upstream-name" }, str(u.name) ?? "?"),
      h("span", { class: `pill ${isUp ? "up" : "down"}`, "data-role": "state" }, isUp ? "up" : "down"),
      breaker ? h("span", { class: `pill ${breaker === "open" ? "open" : "closed"}`, title: "circuit breaker" }, `breaker ${breaker}`) : null,
      h("span", { class: "upstream-url" }, str(u.url) ?? ""),
    );
    const facts = [
      `Ollama ${str(u.version) ?? DASH}`,
      `in flight ${fmtCount(u.in_flight)}`,
      slots === null ? "slots not gated" : `slots ${fmtCount(u.slots_in_use)} in use (${slots} per model)`,
    ];
    if (num(u.max_loaded) !== null) facts.push(`max loaded ${u.max_loaded}`);
    facts.push(`polled ${fmtAgo(u.last_poll, now)}`);
    const models = list(u.models).map((m) => loadedModel(obj(m) || {}, slots, now));
    return h(
      "article",
      { class: `upstream ${isUp ? "up" : "down"}`, "data-upstream": str(u.name) ?? "" },
      head,
      h("div", { class: "upstream-facts" }, facts.join(" · ")),
      str(u.last_error) ? h("div", { class: "upstream-error", title: str(u.last_error) }, `last error: ${u.last_error}`) : null,
      h("ul", { class: "loaded" }, ...(models.length ? models : [h("li", {}, h("span", { class: "none" }, "no model loaded"))])),
    );
  }

  function loadedModel(m, slots, now) {
    const size = num(m.size_bytes);
    const vram = num(m.vram_bytes);
    const share = size && vram !== null ? Math.min(1, Math.max(0, vram / size)) : 0;
    const percent = Math.round(share * 100);
    const bar = h("span");
    bar.style.width = `${percent}%`;
    const use = slots === null ? `${fmtCount(m.in_flight)} in flight` : `${fmtCount(m.slots_in_use)}/${slots} slots`;
    return h(
      "li",
      { "data-model": str(m.name) ?? "" },
      h("span", { class: "model-name" }, str(m.name) ?? "?"),
      h("span", { class: "model-facts" }, `${fmtBytes(size)} · ${use} · ${unloads(m.expires_at, now)}`),
      h("span", { class: "vram", title: `${percent}% in VRAM (${fmtBytes(vram)} of ${fmtBytes(size)})`, role: "img", "aria-label": `${percent}% in VRAM` }, bar),
    );
  }

  const MODEL_COLUMNS = [
    ["requests", fmtCount],
    ["requests_per_second", fmtRate],
    ["prompt_tokens_per_second", fmtRate],
    ["completion_tokens_per_second", fmtRate],
    ["ttft_p50_seconds", fmtSeconds],
    ["ttft_p95_seconds", fmtSeconds],
    ["generation_tokens_per_second", fmtRate],
  ];

  function modelRow(item, name) {
    return h(
      "tr",
      { "data-model": str(item.name) },
      h("td", { class: "name" }, name),
      ...MODEL_COLUMNS.map(([field, format]) => h("td", { class: "num" }, format(item[field]))),
    );
  }

  function sortedItems(items) {
    const key = state.sortKey;
    if (key === null) return items;
    const dir = state.sortDir === "asc" ? 1 : -1;
    return [...items].sort((a, b) => {
      const x = key === "name" ? str(a.name) : num(a[key]);
      const y = key === "name" ? str(b.name) : num(b[key]);
      if (x === y) return 0;
      if (x === null) return 1; // unknown values last, either way
      if (y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }

  function renderModels(models) {
    const items = list(models.items).map((i) => obj(i) || {});
    const withHistory = items.filter((i) => obj(i.history)).length;
    text(
      "models-note",
      `${items.length} model${items.length === 1 ? "" : "s"} with requests in the last 15 minutes; ` +
        `rates over the last ${fmtValue(models.window_seconds)} s` +
        (withHistory ? `; charts of the ${withHistory} busiest` : ""),
    );
    const total = obj(models.total);
    $("models-total").replaceChildren(...(total ? [modelRow(total, "all models")] : []));
    const rows = sortedItems(items).map((item) => modelRow(item, str(item.name) ?? "?"));
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colspan: 8 }, "no requests in the last 15 minutes")));
    $("models-body").replaceChildren(...rows);
    for (const th of document.querySelectorAll("#models-table th")) {
      const field = th.querySelector("button")?.dataset.sort;
      if (field === state.sortKey) th.setAttribute("aria-sort", state.sortDir === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    renderCharts(models, items, num(obj(state.data?.meter)?.started_at));
  }

  function onSort(event) {
    const button = event.target.closest("button[data-sort]");
    if (!button) return;
    const field = button.dataset.sort;
    if (state.sortKey === field) state.sortDir = state.sortDir === "asc" ? "desc" : "asc";
    else {
      state.sortKey = field;
      state.sortDir = field === "name" ? "asc" : "desc";
    }
    if (state.data) renderModels(obj(state.data.models) || {});
  }

  function renderKeys(keys) {
    const items = list(keys.items).map((i) => obj(i) || {});
    const span = num(keys.window_seconds) === 3600 ? "hour" : fmtDuration(keys.window_seconds);
    text("keys-note", `the ${items.length} busiest key${items.length === 1 ? "" : "s"} of the last ${span}`);
    const rows = items.map((k) =>
      h(
        "tr",
        {},
        h("td", { class: "name" }, str(k.key) ?? "?"),
        h("td", { class: "num" }, fmtCount(k.requests)),
        h("td", { class: "num", title: fmtValue(k.prompt_tokens) }, fmtCount(k.prompt_tokens)),
        h("td", { class: "num", title: fmtValue(k.completion_tokens) }, fmtCount(k.completion_tokens)),
        h("td", { class: "num" }, fmtCount(k.refusals)),
      ),
    );
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colspan: 5 }, "no requests in the last hour")));
    $("keys-body").replaceChildren(...rows);

    const today = obj(keys.today);
    $("today").hidden = today === null;
    if (today === null) return;
    const todayItems = list(today.items).map((i) => obj(i) || {});
    text("today-note", `from the usage ledger, since ${fmtUtcDay(today.since)}, as of ${fmtClock(today.as_of)}`);
    const todayRows = todayItems.map((k) =>
      h(
        "tr",
        {},
        h("td", { class: "name" }, str(k.key) ?? "?"),
        h("td", { class: "num" }, fmtCount(k.requests)),
        h("td", { class: "num", title: fmtValue(k.prompt_tokens) }, fmtCount(k.prompt_tokens)),
        h("td", { class: "num", title: fmtValue(k.completion_tokens) }, fmtCount(k.completion_tokens)),
      ),
    );
    if (!todayRows.length) todayRows.push(h("tr", { class: "empty" }, h("td", { colspan: 4 }, "nothing recorded today")));
    $("today-body").replaceChildren(...todayRows);
  }

  function renderProblems(problems, now) {
    const items = problems.map((p) => obj(p) || {});
    text("problems-note", items.length ? `the last ${items.length} errors and refusals, newest first` : "");
    const rows = items.map((p) =>
      h(
        "tr",
        {},
        h("td", { title: fmtAgo(p.time, now) }, fmtClock(p.time)),
        h("td", { class: "num" }, fmtValue(p.status)),
        h("td", {}, str(p.reason) ?? DASH),
        h("td", {}, str(p.route) ?? DASH),
        h("td", { class: "name" }, str(p.model) ?? DASH),
        h("td", {}, str(p.key) ?? DASH),
        h("td", {}, str(p.upstream) ?? DASH),
      ),
    );
    if (!rows.length) rows.push(h("tr", { class: "empty" }, h("td", { colspan: 7 }, "no errors or refusals")));
    $("problems-body").replaceChildren(...rows);
  }

  // A path ("/metrics") is the proxy's own: relative to this page at <base>/-/status, so that
  // the link works behind a reverse proxy's sub path. A full http(s) URL is kept; anything
  // else is not made a link.
  function linkTo(target) {
    const value = str(target);
    if (value === null) return null;
    if (/^https?:\/\//i.test(value)) return value;
    if (value.startsWith("/") && !value.startsWith("//")) return `..${value}`;
    return null;
  }

  function renderProxy(data) {
    const meter = obj(data.meter) || {};
    const links = obj(meter.links) || {};
    text(
      "meter",
      `ollama-meter ${fmtValue(meter.version)} · started ${fmtClock(meter.started_at)} · ` +
        `up ${fmtDuration(meter.uptime_seconds)} · mode ${fmtValue(meter.mode)}`,
    );
    const metrics = linkTo(links.metrics);
    const dashboard = str(links.dashboard);
    const dashboardLink = linkTo(dashboard);
    $("links").replaceChildren(
      "Prometheus metrics: ",
      metrics ? h("a", { href: metrics, id: "metrics-link" }, str(links.metrics)) : "not served",
      " · Grafana dashboard: ",
      dashboardLink
        ? h("a", { href: dashboardLink }, dashboard)
        : h("code", {}, dashboard ?? DASH),
      dashboard && !dashboardLink ? " (in the ollama-meter repository; import it into Grafana)" : "",
    );
    const config = obj(data.config) || {};
    $("config-list").replaceChildren(
      ...Object.entries(config).map(([name, value]) =>
        h("div", { class: "setting" }, h("dt", {}, name), h("dd", {}, fmtValue(value))),
      ),
    );
  }

  // ---- Charts (uPlot): one card per model with history, the total first ----------------

  const charts = new Map(); // id -> { card, plots }
  const dark = window.matchMedia("(prefers-color-scheme: dark)");
  const CHART_HEIGHT = 110;

  function destroyCharts() {
    for (const chart of charts.values()) {
      for (const plot of chart.plots) plot.destroy();
      chart.card.remove();
    }
    charts.clear();
  }

  function palette() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return { muted: v("--muted"), line: v("--line"), s1: v("--series-1"), s2: v("--series-2"), s3: v("--series-3"), s4: v("--series-4") };
  }

  // A value with no neighbour draws no line: such values (the first step with traffic, a
  // lone request) get a dot instead; the others none.
  function isolated(u, seriesIdx) {
    const values = u.data[seriesIdx];
    const found = [];
    for (let i = 0; i < values.length; i++) {
      const before = i > 0 ? values[i - 1] : null;
      const after = i + 1 < values.length ? values[i + 1] : null;
      if (values[i] !== null && before === null && after === null) found.push(i);
    }
    return found;
  }

  const fromZero = (_u, _min, max) => [0, max === null || !(max > 0) ? 1 : max * 1.1];

  function axis(colors, scale, side, format) {
    return {
      scale,
      side,
      stroke: colors.muted,
      font: "10px system-ui, sans-serif",
      size: side === 3 ? 50 : 38,
      gap: 2,
      grid: { show: side === 3, stroke: colors.line, width: 1 },
      ticks: { stroke: colors.line, width: 1, size: 3 },
      values: (_u, ticks) => ticks.map(format),
    };
  }

  function plotOptions(kind, width, colors) {
    const x = {
      values: (_u, ticks) => ticks.map(fmtTick),
      stroke: colors.muted,
      font: "10px system-ui, sans-serif",
      size: 22,
      gap: 2,
      grid: { stroke: colors.line, width: 1 },
      ticks: { stroke: colors.line, width: 1, size: 3 },
    };
    const line = (label, scale, stroke, extra) =>
      Object.assign(
        { label, scale, stroke, width: 1.5, spanGaps: false, points: { show: true, size: 4, width: 1, fill: stroke, filter: isolated } },
        extra,
      );
    const common = {
      width,
      height: CHART_HEIGHT,
      legend: { live: false },
      cursor: { y: false, points: { show: false } },
      padding: [6, 4, 0, 0],
    };
    if (kind === "load") {
      return Object.assign(common, {
        scales: { x: { time: true }, rps: { range: fromZero }, tps: { range: fromZero } },
        series: [{}, line("requests/s", "rps", colors.s1), line("completion tok/s", "tps", colors.s2)],
        axes: [x, axis(colors, "rps", 3, fmtRate), axis(colors, "tps", 1, fmtRate)],
      });
    }
    return Object.assign(common, {
      scales: { x: { time: true }, s: { range: fromZero }, gen: { range: fromZero } },
      series: [
        {},
        line("TTFT p50", "s", colors.s3),
        line("TTFT p95", "s", colors.s4, { dash: [4, 3] }),
        line("generation tok/s", "gen", colors.s1),
      ],
      axes: [x, axis(colors, "s", 3, fmtSeconds), axis(colors, "gen", 1, fmtRate)],
    });
  }

  // A step that ended before the proxy started has no value, whatever the data says.
  function series(values, points, xs, startedAt) {
    const out = list(values).slice(-points).map(num);
    while (out.length < points) out.unshift(null);
    if (startedAt !== null) for (let i = 0; i < points && xs[i] <= startedAt; i++) out[i] = null;
    return out;
  }

  function makeChart(entry) {
    const box = $("charts");
    const first = h("div", { class: "chart", "data-kind": "load" });
    const second = h("div", { class: "chart", "data-kind": "latency" });
    const card = h("div", { class: `chart-card${entry.total ? " total" : ""}`, "data-chart": entry.title }, h("h3", {}, entry.title), first, second);
    box.append(card);
    const width = Math.max(120, first.clientWidth);
    const colors = palette();
    const empty = [[], [], []];
    const plots = [
      new uPlot(plotOptions("load", width, colors), empty, first),
      new uPlot(plotOptions("latency", width, colors), [[], [], [], []], second),
    ];
    return { card, plots };
  }

  // data-points on the chart's box: how many values it drew (what a test can read).
  function draw(plot, data) {
    plot.setData(data);
    const drawn = data.slice(1).reduce((sum, values) => sum + values.filter((v) => v !== null).length, 0);
    plot.root.parentElement.dataset.points = String(drawn);
  }

  function renderCharts(models, items, startedAt) {
    if (typeof window.uPlot !== "function") return;
    const points = num(models.points) ?? 0;
    const step = num(models.step_seconds) ?? 0;
    const end = num(models.history_end);
    if (!points || !step || end === null) return;
    const xs = Array.from({ length: points }, (_, i) => end - (points - 1 - i) * step);
    const entries = [];
    const total = obj(models.total);
    if (total && obj(total.history)) entries.push({ id: "total", title: "all models", history: total.history, total: true });
    for (const item of items) {
      if (obj(item.history) && str(item.name) !== null) entries.push({ id: `model:${item.name}`, title: str(item.name), history: item.history });
    }
    const box = $("charts");
    box.dataset.theme = dark.matches ? "dark" : "light"; // the colours the charts were drawn in
    const seen = new Set();
    entries.forEach((entry, index) => {
      seen.add(entry.id);
      let chart = charts.get(entry.id);
      if (!chart) {
        chart = makeChart(entry);
        charts.set(entry.id, chart);
      }
      if (box.children[index] !== chart.card) box.insertBefore(chart.card, box.children[index] || null);
      const hist = entry.history;
      const line = (values) => series(values, points, xs, startedAt);
      draw(chart.plots[0], [xs, line(hist.requests_per_second), line(hist.completion_tokens_per_second)]);
      draw(chart.plots[1], [
        xs,
        line(hist.ttft_p50_seconds),
        line(hist.ttft_p95_seconds),
        line(hist.generation_tokens_per_second),
      ]);
    });
    for (const [id, chart] of charts) {
      if (seen.has(id)) continue;
      for (const plot of chart.plots) plot.destroy();
      chart.card.remove();
      charts.delete(id);
    }
  }

  function resizeCharts() {
    for (const chart of charts.values()) {
      const width = Math.max(120, chart.card.querySelector(".chart").clientWidth);
      for (const plot of chart.plots) if (plot.width !== width) plot.setSize({ width, height: CHART_HEIGHT });
    }
  }

  // ---- Start -----------------------------------------------------------------------------

  $("key-form").addEventListener("submit", onKeySubmit);
  $("forget-key").addEventListener("click", onForgetKey);
  $("models-table").querySelector("thead").addEventListener("click", onSort);
  if (typeof ResizeObserver === "function") new ResizeObserver(resizeCharts).observe($("charts"));
  // The charts' colours come from the theme: a theme change redraws them.
  dark.addEventListener("change", () => {
    destroyCharts();
    if (state.data) renderModels(obj(state.data.models) || {});
  });
  setInterval(refreshConnection, 1000);
  poll();
})();
