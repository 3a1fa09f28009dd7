// pcme-search web page: no build step. State (query, score, k, index, item) lives in the URL.
"use strict";
const $ = (id) => document.getElementById(id);
const API = "/api/v1";
const ranges = {};   // index name -> modality -> [low, high] mean σ² of its items

function fmt(x, digits = 3) {
  if (x === undefined || x === null) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toFixed(digits);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function stateFromUrl() {
  const p = new URLSearchParams(location.search);
  return Object.fromEntries(p.entries());
}

function formState() {
  const s = { score: $("score").value, k: $("k").value };
  if ($("index").value) s.index = $("index").value;
  return s;
}

function applyState(s) {
  if (s.q !== undefined) $("q").value = s.q;
  if (s.score) $("score").value = s.score;
  if (s.k) {
    if (![...$("k").options].some((o) => o.value === s.k)) $("k").append(el("option", { text: s.k }));
    $("k").value = s.k;
  }
  if (s.index) $("index").value = s.index;
}

async function call(url, options) {
  const r = await fetch(url, options);
  let body;
  try { body = await r.json(); } catch { throw new Error(`HTTP ${r.status}: not JSON`); }
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// One search from a state object: {q} for text, {item: "image:12", target} for more-like-this.
async function run(s, push = true) {
  applyState(s);
  if (push) history.pushState(s, "", "?" + new URLSearchParams(s).toString());
  status("searching…");
  try {
    let result;
    if (s.item) {
      const [modality, id] = s.item.split(":");
      const body = { item: { modality, id: Number(id) }, target: s.target || modality,
                     k: Number(s.k || 20) };
      if (s.score) body.score = s.score;   // none: the server's default for the query's kind
      if (s.index) body.index = s.index;
      result = await call(`${API}/search`, { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
    } else if (s.q) {
      const p = new URLSearchParams({ q: s.q, k: s.k || 20 });
      if (s.score) p.set("score", s.score);
      if (s.index) p.set("index", s.index);
      result = await call(`${API}/search?${p}`);
    } else { clear(); status(""); return; }
    render(result, s);
  } catch (e) { clear(); status(e.message, true); }
}

async function upload(file) {
  const form = new FormData();
  const s = formState();
  form.append("file", file);
  form.append("k", s.k);
  if (s.score) form.append("score", s.score);
  if (s.index) form.append("index", s.index);
  status(`searching captions with ${file.name}…`);
  try {
    const result = await call(`${API}/search/image`, { method: "POST", body: form });
    render(result, s, URL.createObjectURL(file));
  } catch (e) { clear(); status(e.message, true); }
}

function clear() {
  $("grid").replaceChildren(); $("captions").replaceChildren(); $("query").hidden = true;
}

function bar(frac, cls, label) {
  const width = Math.round(100 * Math.min(1, Math.max(0.02, frac)));
  return el("div", { class: `bar ${cls}`, title: label, "aria-label": label },
            el("span", { style: `width:${width}%` }));
}

// σ² as a bar: where it lies (log scale) between the index's 1st and 99th percentile items.
function varBar(value, index, modality, label) {
  const [lo, hi] = ((ranges[index] || {})[modality]) || [value, value];
  const frac = hi > lo ? Math.log(value / lo) / Math.log(hi / lo) : 0.5;
  return bar(frac, "", `${label}: σ² ${fmt(value, 4)} (bar: low to high among the index's ${modality}s)`);
}

function meta(pairs) {
  const dl = el("dl", { class: "meta" });
  for (const [k, v] of pairs) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  return dl;
}

function render(result, s, queryImage) {
  clear();
  const hits = result.results;
  const t = result.timings_ms || {};
  status(`${hits.length} ${result.modality === "image" ? "images" : "captions"} · ${result.score}` +
         ` · ${fmt(t.total_ms, 1)} ms (batch of ${t.batch ?? 1})`);
  const qModality = s.item ? s.item.split(":")[0] : (result.modality === "image" ? "text" : "image");
  const q = $("query");
  q.hidden = false;
  const parts = [el("strong", { text: result.query })];
  parts.push(document.createTextNode(` · query σ² ${fmt(result.query_uncertainty, 4)}`));
  if (result.confidence !== undefined) {
    parts.push(document.createTextNode(` · confidence ${fmt(result.confidence, 2)}`));
    if (result.low_confidence) parts.push(el("span", { class: "low", text: " low confidence" }));
  }
  if (result.unknown_words && result.unknown_words.length)
    parts.push(document.createTextNode(` · ignored: ${result.unknown_words.join(" ")}`));
  q.replaceChildren(...(queryImage ? [el("img", { src: queryImage, alt: "query image" })] : []),
                    el("div", {}, ...parts, varBar(result.query_uncertainty, result.index, qModality, "query uncertainty")));
  const list = result.modality === "image" ? $("grid") : $("captions");
  for (const h of hits) list.append(el("li", {}, hitButton(h, result)));
}

function hitButton(h, result) {
  const pairs = [["rank", `#${h.rank}`], ["score", fmt(h.score)], ["σ²", fmt(h.uncertainty, 4)]];
  if (h.p_match !== undefined) pairs.splice(2, 0, ["p(match)", fmt(h.p_match, 3)]);
  const label = result.modality === "image" ? `image ${h.id}, rank ${h.rank}: more like this`
                                            : `caption ${h.id}: search images with it`;
  const b = el("button", { class: "hit", type: "button", "data-id": h.id, "data-rank": h.rank,
                           "aria-label": label, title: label });
  if (result.modality === "image") {
    b.append(el("img", { src: h.thumb_url, alt: `image ${h.id}`, loading: "lazy" }), meta(pairs));
  } else {
    b.append(el("span", { text: `#${h.rank}` }), el("span", { text: h.item }), meta(pairs.slice(1)));
  }
  if (h.p_match !== undefined) b.append(bar(h.p_match, "pbar", `match probability ${fmt(h.p_match, 3)}`));
  b.append(varBar(h.uncertainty, result.index, result.modality, "uncertainty"));
  const next = { ...formState(), item: `${result.modality}:${h.id}`, target: "image" };
  b.addEventListener("click", () => run(next));
  return b;
}

async function loadIndices() {
  try {
    const { indices } = await call(`${API}/indices`);
    for (const i of indices) {
      const c = i.counts;
      ranges[i.name] = i.uncertainty_range;
      $("index").append(el("option", { value: i.name, text: `${i.name} (${c.image} images, ${c.text} captions)` }));
    }
    $("index").closest("form").querySelector("label[for=index]").hidden = indices.length < 2;
    $("index").hidden = indices.length < 2;
  } catch (e) { status(e.message, true); }
}

function wire() {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    run({ ...formState(), q: $("q").value });
  });
  $("file").addEventListener("change", () => { if ($("file").files[0]) upload($("file").files[0]); });
  window.addEventListener("popstate", (e) => run(e.state || stateFromUrl(), false));
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== $("q")) { e.preventDefault(); $("q").focus(); }
  });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault(); document.body.classList.remove("dragging");
    if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
  });
}

window.addEventListener("DOMContentLoaded", async () => {
  wire();
  await loadIndices();
  const s = stateFromUrl();
  if (s.q || s.item) run(s, false);
});
