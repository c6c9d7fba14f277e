// evomerge dashboard: a job list, and per job the Pareto front, hypervolume, fitness, the
// selected recipe's heatmap and scores, the trial table. Live updates come from
// GET /jobs/{id}/events (server-sent events); nothing here polls the trial table.
"use strict";

const $ = (id) => document.getElementById(id);
const S = { jobs: [], job: null, rows: [], columns: [], sort: "trial", desc: false,
            selected: null, heat: null, source: null, refresh: null, config: {} };

function token() { return localStorage.getItem("evomerge-token") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}
async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = headers(o.headers);
  const r = await fetch(path, o);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); msg = typeof j.detail === "string" ? j.detail
          : (j.detail && j.detail.error) || JSON.stringify(j.detail); } catch (e) { /* text */ }
    throw new Error(msg);
  }
  return r;
}
const json = async (path, opts) => (await api(path, opts)).json();
const fmt = (v) => v === null || v === undefined ? "" :
  typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v);
function say(id, text, bad) { const e = $(id); e.textContent = text; e.className = bad ? "err" : ""; }

// ---- job list -------------------------------------------------------------------------------
async function loadJobs() {
  try { S.jobs = await json("/jobs"); } catch (e) { say("submit-msg", e.message, true); return; }
  const ul = $("jobs");
  ul.innerHTML = "";
  for (const j of S.jobs) {
    const li = document.createElement("li");
    li.dataset.job = j.name;
    li.className = S.job === j.name ? "active" : "";
    const pct = j.budget ? Math.min(100, 100 * j.done / j.budget) : 0;
    li.innerHTML = `<div class="name"></div><div class="state"></div>
      <div class="bar" role="progressbar" aria-valuenow="${j.done}" aria-valuemax="${j.budget}">
      <div style="width:${pct}%"></div></div><div class="meta"></div>`;
    li.querySelector(".name").textContent = j.name;
    li.querySelector(".state").textContent = j.state + (j.error ? " — " + j.error : "");
    li.querySelector(".meta").textContent = `${j.done}/${j.budget} trials` +
      (j.evals_per_min ? ` · ${j.evals_per_min.toFixed(1)}/min` : "") + bestText(j);
    li.onclick = () => selectJob(j.name);
    ul.appendChild(li);
  }
  if (S.job) showHead(S.jobs.find((j) => j.name === S.job));
}
function bestText(j) {
  if (j.best === null || j.best === undefined) return "";
  const b = Array.isArray(j.best) ? j.best.map(fmt).join(" / ") + " (each objective)" : fmt(j.best);
  return ` · best ${b}`;
}
function showHead(j) {
  if (!j) return;
  $("job-name").textContent = j.name;
  $("job-state").textContent = "state: " + j.state;
  $("job-progress").textContent = `${j.done}/${j.budget} trials` +
    (j.elapsed_s ? ` · ${Math.round(j.elapsed_s)} s` : "") +
    (j.evals_per_min ? ` · ${j.evals_per_min.toFixed(1)} evals/min` : "") + bestText(j);
  $("cancel").disabled = !["running", "starting"].includes(j.state);
  $("resume").disabled = !["cancelled", "interrupted", "failed"].includes(j.state);
}

// ---- one job --------------------------------------------------------------------------------
async function selectJob(name) {
  S.job = name; S.selected = null;
  $("empty").hidden = true; $("job").hidden = false; $("selected").hidden = true;
  document.querySelectorAll("#jobs li").forEach((li) =>
    li.classList.toggle("active", li.dataset.job === name));
  location.hash = "job=" + encodeURIComponent(name);
  const t = await json(`/jobs/${name}/trials?limit=10000`);
  S.rows = t.rows; S.columns = t.columns;
  fillAxes();
  renderTable(); await refreshPlots();
  listen(name);
}
function metricColumns() {
  return S.columns.filter((c) => !["trial", "state", "baseline", "error"].includes(c) &&
    S.rows.some((r) => typeof r[c] === "number"));
}
function fillAxes() {
  const cols = metricColumns(), objs = cols.filter((c) => c.startsWith("objective:"));
  for (const [id, i] of [["px", 0], ["py", 1]]) {
    const sel = $(id), keep = sel.value;
    sel.innerHTML = "";
    for (const c of cols) sel.add(new Option(c, c));
    sel.value = cols.includes(keep) ? keep : (objs[i] || cols[i] || cols[0] || "");
  }
}
function listen(name) {
  if (S.source) S.source.close();
  const q = token() && S.config.token_for_reads ? "?token=" + encodeURIComponent(token()) : "";
  S.source = new EventSource(`/jobs/${name}/events${q}`);
  S.source.addEventListener("trial", (ev) => {
    const t = JSON.parse(ev.data);
    const row = Object.assign({ trial: t.trial, state: t.state, baseline: t.baseline,
                                error: t.error || "" }, t.metrics);
    for (const [k, v] of Object.entries(t.values)) row["objective:" + k] = v;
    S.rows = S.rows.filter((r) => r.trial !== t.trial).concat([row]);
    for (const k of Object.keys(row)) if (!S.columns.includes(k)) S.columns.push(k);
    if ($("px").options.length === 0) fillAxes();
    renderTable(); scheduleRefresh();
  });
  S.source.addEventListener("job", (ev) => {
    const j = JSON.parse(ev.data);
    S.jobs = S.jobs.filter((x) => x.name !== j.name).concat([j]);
    if (j.name === S.job) showHead(j);
    loadJobs();
    if (["finished", "cancelled", "failed"].includes(j.state)) reloadRows();
  });
}
async function reloadRows() {  // held-out scores and references arrive after the search phase
  const t = await json(`/jobs/${S.job}/trials?limit=10000`);
  S.rows = t.rows; S.columns = t.columns; renderTable(); scheduleRefresh();
}
function scheduleRefresh() {
  clearTimeout(S.refresh);
  S.refresh = setTimeout(refreshPlots, 800);
}

// ---- plots ----------------------------------------------------------------------------------
const LAYOUT = { margin: { l: 55, r: 10, t: 24, b: 38 }, font: { size: 11 },
                 legend: { orientation: "h", x: 0, y: 1.0, yanchor: "bottom", font: { size: 10 } } };
async function refreshPlots() {
  if (!S.job) return;
  await Promise.all([plotPareto(), plotHypervolume()]);
  plotFitness();
}
async function plotPareto() {
  const x = $("px").value, y = $("py").value;
  if (!x || !y) return;
  const p = await json(`/jobs/${S.job}/pareto?x=${encodeURIComponent(x)}&y=${encodeURIComponent(y)}`);
  const pick = (f) => p.points.filter(f);
  const byNum = new Map(p.points.map((q) => [q.trial, q]));
  const front = p.front.map((n) => byNum.get(n));
  const trace = (pts, name, marker, mode) => ({
    x: pts.map((q) => q.x), y: pts.map((q) => q.y), customdata: pts.map((q) => q.trial),
    text: pts.map((q) => q.recipe), name, mode: mode || "markers", marker,
    hovertemplate: "trial %{customdata}<br>" + x + " %{x:.4g}<br>" + y +
      " %{y:.4g}<br>%{text}<extra></extra>" });
  const sel = pick((q) => q.trial === S.selected);
  const data = [
    trace(pick((q) => q.dominated), "dominated ○", { color: "#9ca3af", symbol: "circle-open", size: 8 }),
    trace(front, "front ◆—", { color: "#1f4fa8", symbol: "diamond", size: 10 },
          "lines+markers"),
    trace(sel, "selected ★", { color: "#d97706", symbol: "star", size: 16,
                                   line: { color: "#000", width: 1 } }),
  ];
  const el = $("pareto");
  el.dataset.points = String(p.points.length);
  el.dataset.front = String(front.length);
  await Plotly.react(el, data, Object.assign({}, LAYOUT, {
    xaxis: { title: { text: short(x) + " (" + p.directions[0] + ")" } },
    yaxis: { title: { text: short(y) + " (" + p.directions[1] + ")" } }, hovermode: "closest",
    hoverlabel: { align: "left", font: { size: 10 } } }),
    { displaylogo: false, responsive: true });
  if (!el.dataset.bound) {
    el.on("plotly_click", (ev) => selectTrial(ev.points[0].customdata));
    el.dataset.bound = "1";
  }
}
const short = (c) => c.replace(/^objective:/, "");
async function plotHypervolume() {
  const hv = await json(`/jobs/${S.job}/hypervolume`);
  const single = (S.jobs.find((j) => j.name === S.job) || { objectives: [1, 2] }).objectives.length === 1;
  $("hv-title").textContent = single ? "Best value over trials" : "Hypervolume over trials";
  await Plotly.react($("hv"), [{ x: hv.map((h) => h.trial), y: hv.map((h) => h.hypervolume),
    mode: "lines+markers", line: { shape: "hv" }, name: single ? "best so far" : "hypervolume" }],
    Object.assign({}, LAYOUT, { xaxis: { title: { text: "trial" } } }),
    { displaylogo: false, responsive: true });
}
function plotFitness() {
  const objs = S.columns.filter((c) => c.startsWith("objective:"));
  const done = S.rows.filter((r) => r.state === "COMPLETE" && typeof r.trial === "number")
    .sort((a, b) => a.trial - b.trial);
  const symbols = ["circle", "square", "diamond", "triangle-up"];
  const data = [];
  objs.forEach((c, i) => {
    const m = c.slice("objective:".length);
    data.push({ x: done.map((r) => r.trial), y: done.map((r) => r[c]), mode: "markers",
                name: m + " " + ["●", "■", "◆", "▲"][i % 4], marker: { symbol: symbols[i % 4], size: 6 } });
    const held = done.filter((r) => typeof r["held_out:" + m] === "number");
    if (held.length) data.push({ x: held.map((r) => r.trial), y: held.map((r) => r["held_out:" + m]),
      mode: "markers", name: "held-out " + m.split("/").pop() + " ✕", marker: { symbol: "x", size: 9 } });
  });
  Plotly.react($("fitness"), data, Object.assign({}, LAYOUT, { xaxis: { title: { text: "trial" } } }),
               { displaylogo: false, responsive: true });
}

// ---- selected trial -------------------------------------------------------------------------
async function selectTrial(n) {
  S.selected = n;
  $("selected").hidden = false;
  $("sel-title").textContent = `Trial ${n}`;
  const [r, sc] = await Promise.all([json(`/jobs/${S.job}/trials/${n}/recipe`),
                                     json(`/jobs/${S.job}/trials/${n}/scores`)]);
  $("recipe").textContent = r.yaml;
  S.heat = r.heatmap;
  const sel = $("hm-param"), keep = sel.value;
  sel.innerHTML = "";
  const opts = S.heat.kind === "dfs" ? ["layer path", "scales"] : Object.keys(S.heat.params);
  for (const o of opts) sel.add(new Option(o, o));
  sel.value = opts.includes(keep) ? keep : (opts.includes("weight") ? "weight" : opts[0]);
  plotHeatmap();
  renderScores(sc);
  renderTable(); plotPareto();
}
function plotHeatmap() {
  const h = S.heat, el = $("heatmap");
  if (!h) return;
  let data, layout;
  if (h.kind === "dfs") {
    const names = [...new Set(h.sources)];
    if ($("hm-param").value === "scales") {
      data = [{ x: h.slots, y: h.scales, type: "bar", name: "scale entering the slot",
                text: h.sources.map((s, i) => `${s}[${h.layers[i]}]`), textposition: "auto" }];
      layout = { xaxis: { title: { text: "slot" } }, yaxis: { title: { text: "scale" } } };
    } else {
      data = [{ z: names.map((s) => h.slots.map((t) => (h.sources[t] === s ? h.layers[t] : null))),
                x: h.slots, y: names, type: "heatmap", colorscale: "Viridis",
                text: names.map((s) => h.slots.map((t) => (h.sources[t] === s ? `layer ${h.layers[t]}` : ""))),
                texttemplate: "%{text}", colorbar: { title: { text: "layer" } } }];
      layout = { xaxis: { title: { text: "slot (path order)" } } };
    }
  } else {
    const p = h.params[$("hm-param").value];
    data = [{ z: p.z, x: p.columns, y: p.rows, type: "heatmap", colorscale: "Viridis",
              texttemplate: "%{z:.2f}", colorbar: { title: { text: $("hm-param").value } },
              hovertemplate: "%{y}, " + p.axis + " %{x}: %{z:.4f}<extra></extra>" }];
    layout = { xaxis: { title: { text: p.axis }, dtick: 1 } };
  }
  el.dataset.kind = h.kind;
  Plotly.react(el, data, Object.assign({}, LAYOUT, layout), { displaylogo: false, responsive: true });
}
function renderScores(sc) {
  const t = $("scores");
  t.innerHTML = "";
  const head = t.createTHead().insertRow();
  for (const c of ["metric", "split", ...sc.columns]) head.appendChild(cell("th", c));
  const body = t.createTBody();
  for (const r of sc.rows) {
    const tr = body.insertRow();
    for (const c of ["metric", "split", ...sc.columns]) tr.appendChild(cell("td", fmt(r[c])));
  }
}
function cell(tag, text) { const e = document.createElement(tag); e.textContent = text; return e; }

async function exportTrial(format) {
  const n = S.selected;
  try {
    if (format === "hf") {
      const name = prompt("folder name (written under the runs folder)", `trial-${n}`);
      if (!name) return;
      const r = await json(`/jobs/${S.job}/trials/${n}/export`, { method: "POST",
        headers: { "content-type": "application/json" }, body: JSON.stringify({ format, name }) });
      say("export-msg", "written: " + r.path);
      return;
    }
    const r = await api(`/jobs/${S.job}/trials/${n}/export`, { method: "POST",
      headers: { "content-type": "application/json" }, body: JSON.stringify({ format }) });
    const blob = await r.blob(), a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${S.job}-trial-${n}-${format}.yaml`;
    document.body.appendChild(a); a.click(); a.remove();
    say("export-msg", "downloaded " + a.download);
  } catch (e) { say("export-msg", e.message, true); }
}

// ---- trial table ----------------------------------------------------------------------------
function renderTable() {
  const cols = S.columns.filter((c) => c !== "error").concat(["error"]);
  const f = $("filter").value.toLowerCase(), st = $("state-filter").value;
  let rows = S.rows.filter((r) => (!st || r.state === st) &&
    (!f || cols.some((c) => String(r[c] ?? "").toLowerCase().includes(f))));
  const k = S.sort, sign = S.desc ? -1 : 1;
  rows = rows.slice().sort((a, b) => {
    const x = a[k], y = b[k];
    if (x === y) return 0;
    if (x === null || x === undefined || x === "") return 1;
    if (y === null || y === undefined || y === "") return -1;
    return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * sign;
  });
  const t = $("trials");
  t.innerHTML = "";
  const head = t.createTHead().insertRow();
  for (const c of cols) {
    const th = cell("th", c + (c === k ? (S.desc ? " ▼" : " ▲") : ""));
    th.setAttribute("aria-sort", c === k ? (S.desc ? "descending" : "ascending") : "none");
    th.onclick = () => { S.desc = S.sort === c ? !S.desc : false; S.sort = c; renderTable(); };
    head.appendChild(th);
  }
  const body = t.createTBody();
  for (const r of rows) {
    const tr = body.insertRow();
    tr.dataset.trial = r.trial;
    if (r.trial === S.selected) tr.className = "selected";
    for (const c of cols) tr.appendChild(cell("td", fmt(r[c])));
    if (typeof r.trial === "number" && r.state !== "RUNNING") tr.onclick = () => selectTrial(r.trial);
  }
  $("trial-count").textContent = `${rows.length} of ${S.rows.length} rows`;
}

// ---- wiring ---------------------------------------------------------------------------------
async function init() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { localStorage.setItem("evomerge-token", decodeURIComponent(m[1])); location.hash = ""; }
  $("token").value = token();
  $("token").onchange = () => { localStorage.setItem("evomerge-token", $("token").value); };
  S.config = await json("/api/config");
  $("server-info").textContent = "v" + S.config.version + (S.config.ray ? " · Ray cluster" : " · local jobs");
  if (S.config.optuna_dashboard) { $("optuna-link").href = S.config.optuna_dashboard; $("optuna-link").hidden = false; }
  $("px").onchange = $("py").onchange = plotPareto;
  $("hm-param").onchange = plotHeatmap;
  $("filter").oninput = $("state-filter").onchange = renderTable;
  $("export-recipe").onclick = () => exportTrial("recipe");
  $("export-mergekit").onclick = () => exportTrial("mergekit");
  $("export-hf").onclick = () => exportTrial("hf");
  $("cancel").onclick = async () => {
    try { await api(`/jobs/${S.job}/cancel`, { method: "POST" }); say("job-msg", "cancel sent"); }
    catch (e) { say("job-msg", e.message, true); } };
  $("resume").onclick = async () => {
    try { await api(`/jobs/${S.job}/resume`, { method: "POST" }); say("job-msg", "resumed"); }
    catch (e) { say("job-msg", e.message, true); } };
  $("submit").onclick = async () => {
    try {
      const j = await json("/jobs", { method: "POST", headers: { "content-type": "application/x-yaml" },
                                     body: $("job-yaml").value });
      say("submit-msg", "submitted " + j.name); await loadJobs(); selectJob(j.name);
    } catch (e) { say("submit-msg", e.message, true); } };
  await loadJobs();
  setInterval(loadJobs, 5000);  // the list only (small); a job's trials come by events
  const jm = location.hash.match(/job=([^&]+)/);
  if (jm) selectJob(decodeURIComponent(jm[1]));
}
init();
