// The status page: polls /api/status and draws each series as an SVG path whose
// `data-points` attribute counts the points drawn (tests read it from the DOM).
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2"];
const W = 480, H = 200, PAD_L = 44, PAD_B = 18, PAD_T = 8, PAD_R = 6;
const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return (Math.round(v * 1000) / 1000).toString();
}

// series: [{name, xs, ys}] (non-finite ys are skipped).
function drawChart(svg, series) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  for (const s of series) {
    s.xs.forEach((x, i) => {
      const y = s.ys[i];
      if (!Number.isFinite(y)) return;
      xmin = Math.min(xmin, x); xmax = Math.max(xmax, x);
      ymin = Math.min(ymin, y); ymax = Math.max(ymax, y);
    });
  }
  el("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W - PAD_R, y2: H - PAD_B }, svg);
  el("line", { class: "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B }, svg);
  if (!isFinite(xmin)) {
    const t = el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg);
    t.textContent = "waiting for steps…";
    svg.setAttribute("data-points", "0");
    return;
  }
  if (ymin > 0 && ymin < 0.25 * ymax) ymin = 0;
  if (ymax === ymin) { ymax += 0.5 * (Math.abs(ymax) || 1); ymin -= 0.5 * (Math.abs(ymin) || 1); }
  if (xmax === xmin) { xmax += 1; }
  const sx = x => PAD_L + (x - xmin) / (xmax - xmin) * (W - PAD_L - PAD_R);
  const sy = y => H - PAD_B - (y - ymin) / (ymax - ymin) * (H - PAD_B - PAD_T);
  for (const [v, y] of [[ymax, PAD_T + 10], [ymin, H - PAD_B - 2]]) {
    const t = el("text", { x: PAD_L - 4, y: y, "text-anchor": "end" }, svg);
    t.textContent = fmt(v);
  }
  const tx = el("text", { x: W - PAD_R, y: H - 4, "text-anchor": "end" }, svg);
  tx.textContent = "step " + xmax;
  const tx0 = el("text", { x: PAD_L, y: H - 4 }, svg);
  tx0.textContent = "step " + xmin;
  let total = 0;
  series.forEach((s, k) => {
    let d = "", n = 0;
    s.xs.forEach((x, i) => {
      const y = s.ys[i];
      if (!Number.isFinite(y)) return;
      d += (n === 0 ? "M" : "L") + sx(x).toFixed(1) + "," + sy(y).toFixed(1);
      n += 1;
    });
    if (n === 1) d += "l0.5,0";
    el("path", { class: "series", "data-series": s.name, "data-points": n, d: d || "M0,0", stroke: COLORS[k % COLORS.length] }, svg);
    total += n;
  });
  svg.setAttribute("data-points", String(total));
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function render(st) {
  const state = document.getElementById("state");
  state.dataset.state = st.state;
  state.textContent = st.state + (st.error ? ": " + st.error : "");
  document.getElementById("progress").textContent =
    "step " + (st.step ?? 0) + " / " + st.total_steps;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  const steps = st.steps || [];
  const xs = steps.map(p => p.step);
  drawChart(document.getElementById("chart-loss"), [{ name: "loss", xs, ys: steps.map(p => p.loss) }]);
  drawChart(document.getElementById("chart-throughput"), [{ name: "clips_per_s", xs, ys: steps.map(p => p.clips_per_s) }]);
  drawChart(document.getElementById("chart-wait"), [{ name: "data_wait_share", xs, ys: steps.map(p => p.data_wait_share) }]);
  const stages = st.stages || [];
  drawChart(document.getElementById("chart-queues"),
    stages.map((name, k) => ({ name, xs, ys: steps.map(p => p.queues[k]) })));
  const legend = document.getElementById("queues-legend");
  legend.textContent = "";
  stages.forEach((name, k) => {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = COLORS[k % COLORS.length];
    span.appendChild(sw);
    span.appendChild(document.createTextNode(name));
    legend.appendChild(span);
  });
  const qbody = document.querySelector("#quarantines tbody");
  qbody.textContent = "";
  for (const q of (st.quarantines || []).slice().reverse()) {
    const tr = document.createElement("tr");
    tr.className = "quarantine";
    cell(tr, new Date(q.time_unix_ms).toLocaleTimeString());
    cell(tr, q.reason);
    cell(tr, q.uri, "uri");
    qbody.appendChild(tr);
  }
  const cbody = document.querySelector("#config tbody");
  cbody.textContent = "";
  for (const [k, v] of Object.entries(st.config || {})) {
    const tr = document.createElement("tr");
    cell(tr, k);
    cell(tr, typeof v === "string" ? v : JSON.stringify(v));
    cbody.appendChild(tr);
  }
}

async function poll() {
  try {
    const resp = await fetch("/api/status", { cache: "no-store" });
    if (resp.ok) render(await resp.json());
  } catch (e) {
    const state = document.getElementById("state");
    state.dataset.state = "unreachable";
    state.textContent = "job unreachable";
  }
  setTimeout(poll, 1000);
}
poll();
