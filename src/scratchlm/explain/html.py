"""One self-contained HTML page to browse an explanation: no network, no build step, open the file.

The page holds the data as JSON in a ``<script type="application/json">`` element (every ``<`` escaped, so no
token text can close it) and a short script that draws with the DOM and a canvas. Token texts reach the page
only through ``textContent``. What it shows:

- the tokens in a row; click one to make it the query: every token it attends to is shaded by its weight in
  the chosen layer and head (or the mean of the heads), as bertviz's head view does;
- the heat map of that layer and head on a canvas (hover for the query, key and weight);
- for the chosen token, the model's top next tokens, the actual next token's probability, rank and surprisal,
  and what the logit lens reads at every layer.

Weights are stored as integers in thousandths, lower triangle only (a causal model's upper triangle is zero).
"""

from __future__ import annotations

import json
import re

import torch

from scratchlm.errors import ConfigError
from scratchlm.explain.views import Explanation

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>scratchlm explain: __TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #1d1d1f; }
h1 { font-size: 1.2em; }
.controls { display: flex; gap: 1.5em; align-items: center; margin: 0.6em 0; }
#tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: 0.8em 0; font-family: ui-monospace, monospace; }
.tok { padding: 2px 4px; border: 1px solid #ccc; border-radius: 3px; cursor: pointer; white-space: pre; }
.tok.query { outline: 2px solid #d33; }
.tok.reply { border-style: dashed; }
.panes { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
canvas { border: 1px solid #ccc; image-rendering: pixelated; }
table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 0.92em; }
td, th { padding: 1px 8px; border-bottom: 1px solid #eee; text-align: left; white-space: pre; }
#hover { min-height: 1.4em; color: #555; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<p>Click a token to make it the query: the tokens it attends to are shaded by their weight. ␣ is a space,
↵ a newline, &lt;E2&gt; a byte that is only part of a character. Dashed tokens are the model's generated reply.</p>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="hover"></span>
</div>
<div id="tokens"></div>
<div class="panes">
  <div><canvas id="map"></canvas><div>rows: queries, columns: keys</div></div>
  <div><h2 id="next-title"></h2><table id="next"></table><h2>logit lens</h2><table id="lens"></table></div>
</div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const T = data.tokens.length, H = data.heads, L = data.layers.length;
let query = T - 1;
const $ = (id) => document.getElementById(id);
function el(tag, text) {
  const n = document.createElement(tag);
  if (text !== undefined) n.textContent = text;
  return n;
}
function weight(layer, head, q, k) {  // thousandths, lower triangle stored row by row
  if (k > q) return 0;
  const heads = head < 0 ? [...Array(H).keys()] : [head];
  let sum = 0;
  for (const h of heads) sum += data.attention[layer][h][q * (q + 1) / 2 + k];
  return sum / heads.length / 1000;
}
function row(cells, header) {
  const tr = el("tr");
  for (const c of cells) tr.append(el(header ? "th" : "td", c));
  return tr;
}
function pct(p) { return (100 * p).toFixed(p < 0.001 ? 3 : 1) + "%"; }
function draw() {
  const layer = +$("layer").value, head = +$("head").value;
  const scale = Math.max(2, Math.min(16, Math.floor(560 / T)));
  const canvas = $("map"), ctx = canvas.getContext("2d");
  canvas.width = canvas.height = T * scale;
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const w = weight(layer, head, q, k);
    ctx.fillStyle = `rgb(${255 - Math.round(220 * w)}, ${255 - Math.round(160 * w)}, 255)`;
    ctx.fillRect(k * scale, q * scale, scale, scale);
  }
  ctx.strokeStyle = "#d33";
  ctx.strokeRect(0, query * scale, T * scale, scale);
  [...$("tokens").children].forEach((node, k) => {
    const w = weight(layer, head, query, k);
    node.style.background = `rgba(30, 100, 230, ${w.toFixed(3)})`;
    node.style.color = w > 0.5 ? "#fff" : "#000";
    node.classList.toggle("query", k === query);
    node.title = `#${k} id ${data.ids[k]}: weight ${w.toFixed(3)} from the query`;
  });
  const pos = data.positions[query];
  $("next-title").textContent = `after #${query} ${data.tokens[query]} (entropy ${pos.entropy.toFixed(2)} bits)`;
  const next = $("next");
  next.replaceChildren(row(["next token", "prob"], true));
  for (const t of pos.top) next.append(row([t.token, pct(t.prob)]));
  if (pos.next) next.append(row([`actual: ${pos.next.token}`,
    `${pct(pos.next.prob)}, rank ${pos.next.rank}, ${pos.next.surprisal.toFixed(2)} bits`]));
  const lens = $("lens");
  lens.replaceChildren(row(["layer", "top prediction", "actual next"], true));
  if (data.lens) for (const layer of data.lens) {
    const p = layer.positions[query];
    lens.append(row([layer.layer, `${p.top[0].token} ${pct(p.top[0].prob)}`,
      p.next_prob === undefined ? "" : `${pct(p.next_prob)} (rank ${p.next_rank})`]));
  }
}
function init() {
  for (let l = 0; l < L; l++) $("layer").append(new Option(`${data.layers[l]}`, l));
  $("head").append(new Option("mean of heads", -1));
  for (let h = 0; h < H; h++) $("head").append(new Option(`${h + 1}`, h));
  data.tokens.forEach((label, k) => {
    const node = el("span", label);
    node.className = "tok" + (k >= data.prompt_tokens ? " reply" : "");
    node.addEventListener("click", () => { query = k; draw(); });
    $("tokens").append(node);
  });
  $("layer").addEventListener("change", draw);
  $("head").addEventListener("change", draw);
  $("map").addEventListener("mousemove", (event) => {
    const scale = $("map").width / T, q = Math.floor(event.offsetY / scale), k = Math.floor(event.offsetX / scale);
    if (q >= T || k >= T) return;
    const w = weight(+$("layer").value, +$("head").value, q, k);
    $("hover").textContent = `query #${q} ${data.tokens[q]} -> key #${k} ${data.tokens[k]}: ${w.toFixed(3)}`;
  });
  $("map").addEventListener("click", (event) => {
    query = Math.min(T - 1, Math.floor(event.offsetY / ($("map").width / T))); draw();
  });
  draw();
}
init();
</script>
</body>
</html>
"""


MAX_WEIGHTS = 8_000_000  # numbers on one page (~30 MB of JSON): a browser still opens it in a second or two


def page_data(view: Explanation, layers: list[int] | None = None) -> dict:
    """What the page needs, compact: weights in thousandths, lower triangle only, of ``layers`` (0-based;
    default all)."""
    if view.attention is None:
        raise ValueError("the page needs the attention weights: explain(..., attention=True)")
    n_layers, n_heads, T, _ = view.attention.shape
    layers = list(range(n_layers)) if layers is None else layers
    numbers = len(layers) * n_heads * T * (T + 1) // 2
    if numbers > MAX_WEIGHTS:
        raise ConfigError(f"the attention page would hold {numbers:,} weights ({len(layers)} layers x {n_heads} "
                          f"heads x {T} tokens squared / 2), too many for a browser: choose fewer layers with "
                          "--layers or a shorter text")
    rows = torch.tril_indices(T, T)  # row by row: (0,0), (1,0), (1,1), (2,0), ...
    thousandths = (view.attention[layers][:, :, rows[0], rows[1]] * 1000).round().int().tolist()
    return {"model": view.model, "tokens": view.tokens, "ids": view.ids, "prompt_tokens": view.prompt_tokens,
            "layers": [n + 1 for n in layers], "heads": n_heads, "attention": thousandths,
            "positions": view.positions, "lens": view.lens}


def render_page(view: Explanation, layers: list[int] | None = None) -> str:
    """The HTML page for ``view`` as a string, with the weights of ``layers`` (0-based; default all)."""
    data = json.dumps(page_data(view, layers), ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</script" (any case) or "<!--" in a token would end or confuse the element.
    data = data.replace("<", "\\u003c")
    title = f"{view.model}, {len(view.ids)} tokens".replace("&", "&amp;").replace("<", "&lt;")
    fill = {"__TITLE__": title, "__DATA__": data}
    return re.sub("__TITLE__|__DATA__", lambda m: fill[m.group(0)], PAGE)
