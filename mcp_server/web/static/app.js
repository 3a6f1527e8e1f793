// blip-tools console: a dashboard, a playground and a search gallery over the server's JSON API.
// Plain JavaScript, no build step, no CDN. Plots are drawn on <canvas>. Every API call carries the server
// token (asked for once, kept in sessionStorage) as `Authorization: Bearer`; images are fetched the same way
// and shown through blob: URLs. Text from the model is always inserted as text, never as HTML.
"use strict";

const TOKEN_KEY = "blip-token";
const COLORS = { blue: "#2f6fed", violet: "#7a4ff0", orange: "#d9822b", green: "#1f9d55", red: "#d64545", grey: "#9aa3b5" };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function toast(message, bad = false) {
  const box = $("toast");
  box.textContent = message;
  box.classList.toggle("bad", bad);
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, bad ? 6000 : 2500);
}

// ------------------------------------------------------------------------------------------ API and token
let tokenWaiters = null;

function askToken(message) {
  $("token-error").textContent = message || "";
  $("token-dialog").hidden = false;
  $("token-input").focus();
  if (!tokenWaiters) tokenWaiters = [];
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

function setupTokenForm() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) { $("token-error").textContent = "Enter the token."; return; }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-dialog").hidden = true;
    const waiters = tokenWaiters || [];
    tokenWaiters = null;
    waiters.forEach((resolve) => resolve());
  });
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch() an API path with the token; on 401 ask for the token and try again.
async function api(path, options = {}) {
  for (let attempt = 0; attempt < 5; attempt++) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", "Bearer " + token);
    const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(token ? "That token was not accepted." : "");
      continue;
    }
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = response.statusText || "request failed";
      try {
        const body = await response.json();
        code = body.error || code;
        message = body.message || message;
      } catch (_) {
        try { message = (await response.text()).trim() || message; } catch (_) { /* keep statusText */ }
      }
      throw new ApiError(response.status, code, message);
    }
    return response;
  }
  throw new ApiError(401, "unauthorized", "No valid token.");
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function busy(button, promise) {
  button.disabled = true;
  return promise.finally(() => { button.disabled = false; });
}

function showError(target, error) {
  const text = error instanceof ApiError ? `${error.message} (${error.code})` : String(error.message || error);
  if (target) {
    target.replaceChildren(el("div", { class: "error", text }));
  }
  toast(text, true);
}

// ------------------------------------------------------------------------------------------ tabs
function setupTabs() {
  document.querySelectorAll(".tab").forEach((tab) => {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  });
  const fromHash = () => {
    const name = (location.hash || "#dashboard").slice(1);
    showView(["dashboard", "playground", "gallery"].includes(name) ? name : "dashboard");
  };
  window.addEventListener("hashchange", fromHash);
  fromHash();
}

function showView(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === name));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === "view-" + name));
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "dashboard") redrawCharts();
}

// ------------------------------------------------------------------------------------------ charts
// A y-axis top whose quarter is a round number (1, 2, 2.5 or 5 times a power of ten).
function niceMax(value) {
  if (!(value > 0)) return 4;
  const quarter = value / 4;
  const exp = Math.pow(10, Math.floor(Math.log10(quarter)));
  for (const step of [1, 2, 2.5, 5, 10]) if (quarter <= step * exp) return 4 * step * exp;
  return 40 * exp;
}

function prepareCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 400;
  const height = canvas.clientHeight || 190;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height };
}

function drawAxes(ctx, box, yMax, yLabel) {
  ctx.strokeStyle = "#e2e6ee";
  ctx.fillStyle = "#6b7385";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = box.top + box.h - (box.h * i) / 4;
    ctx.beginPath();
    ctx.moveTo(box.left, Math.round(y) + 0.5);
    ctx.lineTo(box.left + box.w, Math.round(y) + 0.5);
    ctx.stroke();
    const v = (yMax * i) / 4;
    const digits = yMax / 4 >= 1 ? 0 : Math.min(3, Math.ceil(-Math.log10(yMax / 4) + 0.3));
    ctx.fillText(fmt(v, digits), box.left - 6, y);
  }
  if (yLabel) {
    ctx.textAlign = "left";
    ctx.fillText(yLabel, box.left, box.top - 8);
  }
}

// series: [{name, color, values: (number|null)[], fill?: bool, step?: bool}]; xs: seconds relative to now.
function lineChart(canvas, xs, series, opts = {}) {
  const { ctx, width, height } = prepareCanvas(canvas);
  const box = { left: 44, top: 18, w: width - 56, h: height - 42 };
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  const yMax = niceMax(max * 1.1 || opts.minMax || 1);
  drawAxes(ctx, box, yMax, opts.unit);
  const n = xs.length;
  const xAt = (i) => box.left + (n <= 1 ? box.w : (box.w * i) / (n - 1));
  const yAt = (v) => box.top + box.h - (box.h * v) / yMax;
  // x labels
  ctx.fillStyle = "#6b7385";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let k = 0; k <= 4; k++) {
    const i = Math.round(((n - 1) * k) / 4);
    const label = xs[i] === 0 ? "now" : xs[i] + "s";
    ctx.fillText(label, xAt(i), box.top + box.h + 6);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    let path = [];
    const flush = () => {
      if (path.length === 1) {
        ctx.beginPath();
        ctx.arc(path[0][0], path[0][1], 2.5, 0, 2 * Math.PI);
        ctx.fill();
      } else if (path.length > 1) {
        if (s.fill) {
          ctx.globalAlpha = 0.12;
          ctx.beginPath();
          ctx.moveTo(path[0][0], box.top + box.h);
          for (const [x, y] of path) ctx.lineTo(x, y);
          ctx.lineTo(path[path.length - 1][0], box.top + box.h);
          ctx.closePath();
          ctx.fill();
          ctx.globalAlpha = 1;
        }
        ctx.beginPath();
        path.forEach(([x, y], j) => {
          if (j === 0) ctx.moveTo(x, y);
          else if (s.step) { ctx.lineTo(x, path[j - 1][1]); ctx.lineTo(x, y); } else ctx.lineTo(x, y);
        });
        ctx.stroke();
      }
      path = [];
    };
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) flush();
      else path.push([xAt(i), yAt(v)]);
    });
    flush();
  }
  // legend
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  let x = box.left + box.w;
  for (const s of [...series].reverse()) {
    const w = ctx.measureText(s.name).width;
    ctx.fillStyle = "#6b7385";
    ctx.fillText(s.name, x, box.top - 8);
    ctx.fillStyle = s.color;
    ctx.fillRect(x - w - 14, box.top - 11, 9, 6);
    x -= w + 26;
  }
}

function barChart(canvas, labels, values, color) {
  const { ctx, width, height } = prepareCanvas(canvas);
  const box = { left: 44, top: 18, w: width - 56, h: height - 42 };
  const yMax = niceMax(Math.max(0, ...values) * 1.1 || 1);
  drawAxes(ctx, box, yMax, "batches");
  if (!labels.length) {
    ctx.fillStyle = "#6b7385";
    ctx.textAlign = "center";
    ctx.fillText("no batches yet", box.left + box.w / 2, box.top + box.h / 2);
    return;
  }
  const slot = box.w / labels.length;
  const barW = Math.max(4, Math.min(48, slot * 0.7));
  labels.forEach((label, i) => {
    const x = box.left + slot * i + (slot - barW) / 2;
    const h = (box.h * values[i]) / yMax;
    ctx.fillStyle = color;
    ctx.fillRect(x, box.top + box.h - h, barW, h);
    ctx.fillStyle = "#6b7385";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText(String(label), x + barW / 2, box.top + box.h + 6);
    if (values[i] > 0) {
      ctx.textBaseline = "bottom";
      ctx.fillText(fmt(values[i]), x + barW / 2, box.top + box.h - h - 2);
    }
  });
}

// ------------------------------------------------------------------------------------------ dashboard
let lastDashboard = null;
let dashTimer = null;

function redrawCharts() {
  if (!lastDashboard) return;
  const { live, stats } = lastDashboard;
  if (live) {
    const now = Math.floor(live.now);
    const xs = live.series.map((p) => p.t - now);
    const pick = (key) => live.series.map((p) => p[key]);
    lineChart($("chart-throughput"), xs, [
      { name: "completed/s", color: COLORS.blue, values: pick("throughput"), fill: true },
      { name: "failed/s", color: COLORS.red, values: pick("failed") },
    ], { unit: "req/s" });
    lineChart($("chart-latency"), xs, [
      { name: "p50", color: COLORS.blue, values: pick("p50_ms") },
      { name: "p90", color: COLORS.violet, values: pick("p90_ms") },
      { name: "p99", color: COLORS.orange, values: pick("p99_ms") },
    ], { unit: "ms" });
    lineChart($("chart-batch"), xs, [
      { name: "mean", color: COLORS.blue, values: pick("mean_batch") },
      { name: "max", color: COLORS.violet, values: live.series.map((p) => (p.batches ? p.max_batch : null)) },
    ], { unit: "requests/batch" });
    lineChart($("chart-queue"), xs, [
      { name: "queue depth", color: COLORS.orange, values: pick("queue_depth"), fill: true, step: true },
    ], { unit: "requests" });
  }
  const sizes = Object.keys(stats.batch_size_histogram).map(Number).sort((a, b) => a - b);
  barChart($("chart-hist"), sizes, sizes.map((k) => stats.batch_size_histogram[k]), COLORS.violet);
}

function renderDashboard(data) {
  lastDashboard = data;
  const s = data.stats;
  const live = data.live;
  $("stat-requests").textContent = fmt(s.requests);
  $("stat-requests-sub").textContent = `${fmt(s.completed)} completed · ${fmt(s.cancelled)} cancelled`;
  $("stat-throughput").textContent = live ? fmt(live.summary.recent_per_s, 1) : "–";
  $("stat-throughput-sub").textContent = live
    ? `requests/s, last ${live.summary.recent_s} s · ${fmt(live.summary.throughput_per_s, 2)} over the window`
    : "";
  $("stat-latency").textContent = live
    ? [live.summary.p50_ms, live.summary.p90_ms, live.summary.p99_ms].map((v) => fmt(v, v !== null && v < 10 ? 1 : 0)).join(" / ")
    : "–";
  const capacity = data.model ? data.model.limits.max_queue : null;
  $("stat-queue").textContent = fmt(s.queue_depth);
  $("stat-queue-sub").textContent = capacity ? `of ${fmt(capacity)} before rejecting` : "";
  $("stat-batches").textContent = fmt(s.batches);
  $("stat-batches-sub").textContent = s.batches ? `${fmt(s.requests / Math.max(1, s.batches), 2)} requests per batch · ${fmt(s.retries)} retried` : "";
  $("stat-errors").textContent = `${fmt(s.errors)} / ${fmt(s.rejected)}`;
  $("stat-errors-sub").textContent = `${fmt(s.expired)} expired`;
  const lookups = s.cache_hits + s.cache_misses;
  $("stat-cache").textContent = lookups ? fmt((100 * s.cache_hits) / lookups, 0) + "%" : "–";
  $("stat-cache-sub").textContent = `${fmt(s.cache_hits)} hits · ${fmt(s.prefix_cache_hits)} prefix hits`;
  $("stat-load").textContent = fmt(s.model_load_s, 2) + " s";
  $("stat-load-sub").textContent = `${fmt(s.models_loaded)} checkpoint(s) · up ${fmt(s.uptime_s)} s`;
  const body = $("task-table").querySelector("tbody");
  body.replaceChildren(
    ...Object.entries(s.per_task).sort().map(([task, t]) =>
      el("tr", {}, el("td", { text: task }), el("td", { text: fmt(t.requests) }), el("td", { text: fmt(t.batches) }),
        el("td", { text: t.batches ? fmt(t.requests / t.batches, 2) : "–" }), el("td", { text: fmt(t.errors) })))
  );
  setStatus(data.status);
  $("dash-updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("dash-updated").dataset.requests = String(s.requests);
  if ($("view-dashboard").classList.contains("active")) redrawCharts();
}

async function pollDashboard() {
  clearTimeout(dashTimer);
  try {
    const data = await apiJson("/ui/api/dashboard?window=" + $("dash-window").value);
    data.model = modelInfo;
    renderDashboard(data);
  } catch (error) {
    $("dash-updated").textContent = "update failed: " + (error.message || error);
  }
  if ($("dash-live").checked) dashTimer = setTimeout(pollDashboard, 1000);
}

function setupDashboard() {
  $("dash-window").addEventListener("change", pollDashboard);
  $("dash-live").addEventListener("change", () => { if ($("dash-live").checked) pollDashboard(); else clearTimeout(dashTimer); });
  window.addEventListener("resize", redrawCharts);
}

// ------------------------------------------------------------------------------------------ playground
let currentFile = null;
let previewUrl = null;

function setFile(file) {
  if (!file) return;
  if (modelLimits && file.size > modelLimits.max_image_bytes) {
    toast(`This file is ${fmt(file.size)} bytes; the server accepts at most ${fmt(modelLimits.max_image_bytes)}.`, true);
    return;
  }
  currentFile = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
  $("file-info").textContent = `${file.name} · ${fmt(file.size)} bytes`;
  ["caption-result", "answers", "score-result", "locate-result"].forEach((id) => $(id).replaceChildren());
}

function needFile(target) {
  if (currentFile) return true;
  showError(target, new Error("Drop or pick an image first."));
  return false;
}

function postImage(path) {
  return apiJson(path, {
    method: "POST",
    body: currentFile,
    headers: { "Content-Type": currentFile.type || "application/octet-stream" },
  });
}

function confidenceBar(label, value) {
  const pct = Math.max(0, Math.min(1, value || 0)) * 100;
  const bar = el("div", { class: "bar" }, el("span"));
  bar.firstChild.style.width = pct.toFixed(1) + "%";
  return el("div", { class: "barbox" }, el("span", { text: `${label} ${fmt(value, 3)}` }), bar);
}

function timingLine(timing, extra = "") {
  return el("div", {
    class: "timing",
    text: `queue ${fmt(timing.queue_ms, 1)} ms · model ${fmt(timing.inference_ms, 1)} ms · total ${fmt(timing.total_ms, 1)} ms · batch of ${timing.batch_size}${extra}`,
  });
}

function generatedLines(texts, prefix) {
  return texts.map((g) => {
    const bars = el("div", {}, confidenceBar("confidence", g.confidence));
    if (g.itm_probability !== null && g.itm_probability !== undefined) bars.append(confidenceBar("ITM", g.itm_probability));
    const text = el("div", { class: "text" });
    if (prefix) text.append(el("span", { class: "q", text: prefix + " " }));
    text.append(g.text || "(empty)");
    return el("div", { class: "line" }, text, bars);
  });
}

async function doCaption() {
  const out = $("caption-result");
  if (!needFile(out)) return;
  const params = new URLSearchParams();
  const prompt = $("caption-prompt").value.trim();
  if (prompt) params.set("prompt", prompt);
  params.set("max_new_tokens", $("caption-tokens").value || "30");
  const beams = Number($("caption-beams").value || 1);
  const n = Number($("caption-n").value || 1);
  params.set("num_beams", String(Math.max(beams, n)));
  params.set("num_return_sequences", String(n));
  try {
    const result = await busy($("caption-btn"), postImage("/ui/api/caption?" + params));
    out.replaceChildren(...generatedLines(result.captions, prompt ? "[" + prompt + "]" : ""),
      timingLine(result.timing, ` · ${result.image.width}×${result.image.height}`));
    out.dataset.caption = result.caption;
  } catch (error) { showError(out, error); }
}

async function doAsk() {
  const out = $("answers");
  if (!needFile(out)) return;
  const question = $("question").value.trim();
  if (!question) { showError(out, new Error("Type a question.")); return; }
  try {
    const result = await busy($("ask-btn"), postImage("/ui/api/answer?" + new URLSearchParams({ question })));
    out.prepend(...generatedLines(result.answers, "Q: " + question + " →"), timingLine(result.timing));
  } catch (error) { showError(out, error); }
}

async function doScore() {
  const out = $("score-result");
  if (!needFile(out)) return;
  const texts = $("score-texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!texts.length) { showError(out, new Error("Write one text per line.")); return; }
  const params = new URLSearchParams();
  texts.forEach((t) => params.append("text", t));
  try {
    const result = await busy($("score-btn"), postImage("/ui/api/score?" + params));
    const rows = [...result.scores].sort((a, b) => b.itm_probability - a.itm_probability).map((s) =>
      el("div", { class: "line" + (s.text === result.best ? " best" : "") }, el("div", { class: "text", text: s.text }),
        el("div", {}, confidenceBar("ITM", s.itm_probability), confidenceBar("ITC", (s.itc + 1) / 2))));
    out.replaceChildren(...rows, timingLine(result.timing));
  } catch (error) { showError(out, error); }
}

async function doLocate() {
  const out = $("locate-result");
  if (!needFile(out)) return;
  const text = $("locate-text").value.trim();
  if (!text) { showError(out, new Error("Type what to find, e.g. 'a red car'.")); return; }
  try {
    const result = await busy($("locate-btn"), postImage("/ui/api/locate?" + new URLSearchParams({ text })));
    out.replaceChildren(el("img", { class: "overlay-img", src: result.overlay, alt: "heatmap for " + text }),
      el("div", { class: "small", text: result.summary }), timingLine(result.timing));
  } catch (error) { showError(out, error); }
}

function setupPlayground() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((name) => drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((name) => drop.addEventListener(name, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) setFile(file);
  });
  $("file-input").addEventListener("change", () => setFile($("file-input").files[0]));
  $("caption-btn").addEventListener("click", doCaption);
  $("ask-btn").addEventListener("click", doAsk);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") doAsk(); });
  $("score-btn").addEventListener("click", doScore);
  $("locate-btn").addEventListener("click", doLocate);
  $("locate-text").addEventListener("keydown", (e) => { if (e.key === "Enter") doLocate(); });
}

// ------------------------------------------------------------------------------------------ gallery
let lastQuery = "";
let selected = null;
const thumbUrls = [];

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

async function doSearch() {
  const query = $("search-input").value.trim();
  if (!query) { toast("Type what to look for.", true); return; }
  const params = new URLSearchParams({ q: query, top_k: $("search-k").value, rerank: String($("search-rerank").checked) });
  try {
    const result = await busy($("search-btn"), apiJson("/ui/api/search?" + params));
    lastQuery = query;
    renderResults(result);
  } catch (error) { showError($("search-summary"), error); }
}

function renderResults(result) {
  thumbUrls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  closeDetail();
  const grid = $("results");
  $("search-summary").textContent = result.hits.length
    ? `${result.hits.length} of ${fmt(result.searched)} images for “${result.query}” · ${fmt(result.elapsed_ms, 1)} ms${result.reranked ? " · ITM re-ranked" : ""}`
    : `No indexed image matches “${result.query}” (searched ${fmt(result.searched)}). Index a folder first.`;
  grid.replaceChildren(...result.hits.map((hit, i) => {
    const img = el("img", { alt: baseName(hit.path) });
    const card = el("div", { class: "card hit", "data-path": hit.path, "data-rank": String(i + 1), "data-score": String(hit.score) },
      el("span", { class: "rank", text: "#" + (i + 1) }),
      el("div", { class: "thumb" }, img),
      el("div", { class: "meta" },
        el("div", { class: "name", text: baseName(hit.path), title: hit.path }),
        el("div", { class: "score", text: `score ${fmt(hit.score, 3)}` + (hit.itm_probability != null ? ` · ITM ${fmt(hit.itm_probability, 3)}` : "") }),
        el("div", { class: "caption", text: hit.caption || "" })));
    card.addEventListener("click", () => openDetail(hit, card));
    blobUrl("/ui/api/thumb?" + new URLSearchParams({ path: hit.path, size: "256" }))
      .then((url) => { thumbUrls.push(url); img.src = url; img.dataset.loaded = "1"; })
      .catch((error) => { img.alt = "thumbnail failed: " + error.message; });
    return card;
  }));
}

async function openDetail(hit, card) {
  selected = hit;
  document.querySelectorAll(".hit").forEach((c) => c.classList.toggle("selected", c === card));
  $("detail").hidden = false;
  document.querySelector(".gallery-layout").classList.add("with-detail");
  $("detail-title").textContent = baseName(hit.path);
  $("detail-overlay").hidden = true;
  $("detail-overlay-caption").textContent = "heatmap";
  $("detail-locate").textContent = `Show heatmap for “${lastQuery}”`;
  $("detail-meta").replaceChildren(
    el("div", { text: hit.path }),
    el("div", { text: `score ${fmt(hit.score, 3)} · ITC ${fmt(hit.itc, 3)}` + (hit.width ? ` · ${hit.width}×${hit.height}` : "") }),
    el("div", { class: "muted", text: hit.caption || "" }));
  try {
    const url = await blobUrl("/ui/api/thumb?" + new URLSearchParams({ path: hit.path, size: "512" }));
    thumbUrls.push(url);
    if (selected === hit) $("detail-image").src = url;
  } catch (error) { showError(null, error); }
}

function closeDetail() {
  selected = null;
  $("detail").hidden = true;
  document.querySelector(".gallery-layout").classList.remove("with-detail");
  document.querySelectorAll(".hit").forEach((c) => c.classList.remove("selected"));
}

async function doDetailLocate() {
  if (!selected || !lastQuery) return;
  const hit = selected;
  try {
    const result = await busy($("detail-locate"),
      apiJson("/ui/api/locate?" + new URLSearchParams({ path: hit.path, text: lastQuery }), { method: "POST" }));
    if (selected !== hit) return;
    $("detail-overlay").src = result.overlay;
    $("detail-overlay").hidden = false;
    $("detail-overlay-caption").textContent = `“${lastQuery}” · ITM ${fmt(result.itm_probability, 3)}`;
    $("detail-meta").append(el("div", { class: "small", text: result.summary }));
  } catch (error) { showError(null, error); }
}

async function doIndex() {
  const directory = $("index-dir").value.trim();
  if (!directory) { toast("Type the folder's absolute path.", true); return; }
  $("index-result").textContent = "indexing… (large folders take a while)";
  try {
    const result = await busy($("index-btn"), apiJson("/ui/api/index", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ directory, recursive: $("index-recursive").checked, captions: $("index-captions").checked }),
    }));
    $("index-result").textContent = result.summary;
  } catch (error) { showError($("index-result"), error); }
}

function setupGallery() {
  $("search-btn").addEventListener("click", doSearch);
  $("search-input").addEventListener("keydown", (e) => { if (e.key === "Enter") doSearch(); });
  $("detail-close").addEventListener("click", closeDetail);
  $("detail-locate").addEventListener("click", doDetailLocate);
  $("index-btn").addEventListener("click", doIndex);
}

// ------------------------------------------------------------------------------------------ start
let modelInfo = null;
let modelLimits = null;

function setStatus(status) {
  const dot = $("status-dot");
  dot.className = "dot " + status;
  dot.title = "service: " + status;
}

async function loadInfo() {
  const info = await apiJson("/ui/api/info");
  modelInfo = info.model;
  modelLimits = { max_image_bytes: info.max_image_bytes };
  const name = info.model.model.split(/[\\/]/).filter(Boolean).slice(-2).join("/");
  $("model-name").textContent = `${name} · ${info.model.device}/${info.model.dtype}`;
  $("model-name").title = `${info.model.model}\nretrieval: ${info.model.retrieval_model}\nindex: ${info.index_path}`;
  setStatus(info.status);
  document.body.dataset.ready = "1";
}

async function start() {
  setupTokenForm();
  setupTabs();
  setupDashboard();
  setupPlayground();
  setupGallery();
  try {
    await loadInfo();
  } catch (error) {
    showError(null, error);
  }
  pollDashboard();
}

document.addEventListener("DOMContentLoaded", start);
