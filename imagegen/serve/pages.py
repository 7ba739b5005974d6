"""The review pages, rendered on the server: plain HTML with inline CSS and a little inline JS
(nonce'd for the Content-Security-Policy). No assets from the network, nothing from a CDN.
Every value from a run (prompts, names, notes) is escaped into the HTML or set as text by the
script; nothing is inserted as markup. Starlette-free: functions return strings.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from urllib.parse import urlencode

from imagegen.serve.runs import Delivery, GalleryItem
from imagegen.units import fmt_eta

e = html.escape

CSS = """
*{box-sizing:border-box}body{margin:0;font:16px/1.4 system-ui,-apple-system,sans-serif;background:#111;color:#eee}
a{color:#8cf}header{display:flex;gap:1em;align-items:center;flex-wrap:wrap;padding:.6em 1em;background:#222;position:sticky;top:0;z-index:5}
header h1{font-size:1.1em;margin:0;flex:1 1 auto;overflow-wrap:anywhere}.role{font-size:.8em;padding:.2em .6em;border-radius:1em;background:#444}
main{padding:1em}button,select,.btn{font:inherit;min-height:44px;min-width:44px;padding:.4em .8em;border-radius:.5em;border:1px solid #555;background:#2a2a2a;color:#eee;touch-action:manipulation}
button[aria-pressed=true]{background:#2d6a2d;border-color:#5c5}.btn{display:inline-flex;align-items:center;text-decoration:none}
.runs{display:grid;gap:.8em;grid-template-columns:repeat(auto-fill,minmax(280px,1fr))}.run{background:#1c1c1c;border-radius:.6em;padding:.8em}
.bar{height:10px;background:#333;border-radius:5px;overflow:hidden;margin:.4em 0}.bar i{display:block;height:100%;background:#4a4}
.stats{font-size:.9em;color:#bbb}.err{color:#f88}
#filters{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:1em;align-items:center}
#cards{display:grid;gap:.6em;grid-template-columns:repeat(auto-fill,minmax(150px,1fr))}
.card{margin:0;background:#1c1c1c;border-radius:.5em;overflow:hidden}.card.picked{outline:3px solid #5c5}
.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#000;display:block;cursor:zoom-in}
.card figcaption{padding:.3em;font-size:.8em;display:flex;flex-wrap:wrap;gap:.3em;align-items:center}
.cap{flex:1 1 100%;color:#bbb;overflow-wrap:anywhere}.note{flex:1 1 100%;color:#fd8;overflow-wrap:anywhere}
.idx{font-weight:bold}.cmp{display:flex;align-items:center;gap:.2em;min-height:44px}.cmp input{width:24px;height:24px}
#lightbox{position:fixed;inset:0;background:#000e;z-index:10;display:flex;align-items:center;justify-content:center;overflow:auto}
#lightbox[hidden]{display:none}#lightbox img{max-width:100vw;max-height:100vh;cursor:zoom-in}
#lightbox.zoom{display:block}#lightbox.zoom img{max-width:none;max-height:none;cursor:zoom-out}
#lightbox .close{position:fixed;top:.5em;right:.5em;z-index:11}
.compare{display:grid;gap:.6em;grid-template-columns:repeat(auto-fit,minmax(min(100%,300px),1fr))}
.compare figure{margin:0}.compare img{width:100%;display:block;background:#000;cursor:zoom-in}
.deliveries{display:grid;gap:.8em;grid-template-columns:repeat(auto-fill,minmax(260px,1fr))}
.deliveries figure{margin:0;background:#1c1c1c;border-radius:.5em;overflow:hidden}.deliveries img{width:100%;display:block;background:#000}
.deliveries figcaption{padding:.5em;font-size:.9em}#status{min-height:1.4em;color:#fd8}
.queue{border-collapse:collapse;font-size:.9em;display:block;overflow-x:auto}.queue td,.queue th{padding:.3em .6em;border-bottom:1px solid #333;text-align:left}
#comparebar{position:sticky;bottom:0;padding:.5em;background:#222;display:flex;gap:.5em;align-items:center}#comparebar[hidden]{display:none}
"""

COMMON_JS = r"""
const CSRF = document.querySelector('meta[name=csrf]').content;
async function post(url, body) {
  const r = await fetch(url, {method: 'POST', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': CSRF}, body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({error: r.status + ' ' + r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function say(text) { const s = document.getElementById('status'); if (s) s.textContent = text; }
const box = document.getElementById('lightbox');
function openFull(src) {
  if (!box) return;
  box.querySelector('img').src = src; box.classList.remove('zoom'); box.hidden = false;
}
if (box) {
  box.querySelector('img').addEventListener('click', ev => { ev.stopPropagation(); box.classList.toggle('zoom'); });
  box.addEventListener('click', () => { box.hidden = true; });
  document.addEventListener('keydown', ev => { if (ev.key === 'Escape') box.hidden = true; });
}
document.querySelectorAll('[data-full]').forEach(el => el.addEventListener('click', ev => {
  ev.preventDefault(); openFull(el.dataset.full); }));
"""

PICKS_JS = r"""
const RUN = document.body.dataset.run;
const picksUrl = '/api/picks?' + new URLSearchParams({run: RUN});
function applyPicks(state) {
  const picked = new Set(state.picks); const notes = state.notes || {};
  document.querySelectorAll('[data-index]').forEach(card => {
    const i = Number(card.dataset.index); const on = picked.has(i);
    card.classList.toggle('picked', on);
    const b = card.querySelector('.pick'); if (b) b.setAttribute('aria-pressed', String(on));
    const n = card.querySelector('.note'); if (n) n.textContent = on && notes[i] ? notes[i] : '';
  });
  const c = document.getElementById('count'); if (c) c.textContent = picked.size + ' picked';
  if (state.error) say(state.error);
  if (typeof filter === 'function') filter();
}
async function refreshPicks() {
  try { const r = await fetch(picksUrl, {credentials: 'same-origin'}); if (r.ok) applyPicks(await r.json()); } catch (e) {}
}
async function setPick(index, picked, note) {
  const body = {index: index, picked: picked}; if (note !== undefined) body.note = note;
  try { applyPicks(await post(picksUrl, body)); say(''); } catch (e) { say('pick not saved: ' + e.message); }
}
document.querySelectorAll('[data-index]').forEach(card => {
  const i = Number(card.dataset.index);
  const b = card.querySelector('.pick');
  if (b) b.addEventListener('click', () => setPick(i, b.getAttribute('aria-pressed') !== 'true'));
  const n = card.querySelector('.notebtn');
  if (n) n.addEventListener('click', () => {
    const old = card.querySelector('.note').textContent;
    const text = window.prompt('Note for pick ' + i + ' (saved in picks.txt)', old);
    if (text !== null) setPick(i, true, text);
  });
});
setInterval(refreshPicks, 10000);
document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshPicks(); });
"""

GALLERY_JS = r"""
const selects = Array.from(document.querySelectorAll('#filters select[data-axis]'));
const pickedSel = document.getElementById('filter-picked');
function filter() {
  let shown = 0; const cards = document.querySelectorAll('#cards .card');
  cards.forEach(card => {
    const axes = JSON.parse(card.dataset.axes);
    let ok = selects.every(s => !s.value || (axes[s.dataset.axis] ?? '(none)') === s.value);
    const p = card.classList.contains('picked');
    if (pickedSel.value === 'picked') ok = ok && p;
    if (pickedSel.value === 'unpicked') ok = ok && !p;
    card.hidden = !ok; if (ok) shown++;
  });
  document.getElementById('shown').textContent = 'showing ' + shown + ' of ' + cards.length;
}
selects.concat([pickedSel]).forEach(s => s.addEventListener('change', filter));
const bar = document.getElementById('comparebar');
function compareChanged() {
  const chosen = Array.from(document.querySelectorAll('.cmp input:checked')).map(c => c.value);
  bar.hidden = chosen.length < 2;
  const link = document.getElementById('compare');
  link.textContent = 'Compare ' + chosen.length + (chosen.length > 4 ? ' (4 at most)' : '');
  const q = new URLSearchParams({run: RUN}); chosen.slice(0, 4).forEach(i => q.append('i', i));
  link.href = '/compare?' + q;
}
document.querySelectorAll('.cmp input').forEach(c => c.addEventListener('change', compareChanged));
filter();
"""

RUNS_JS = r"""
function fmtEta(s) { if (s === null || s === undefined) return 'unknown'; s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return h ? h + 'h' + String(m).padStart(2, '0') + 'm' : (m ? m + 'm' + String(r).padStart(2, '0') + 's' : r + 's'); }
async function refreshRuns() {
  try {
    const r = await fetch('/api/runs', {credentials: 'same-origin'}); if (!r.ok) return;
    for (const run of (await r.json()).runs) {
      const el = document.querySelector('.run[data-run="' + CSS.escape(run.name) + '"]'); if (!el || run.error) continue;
      el.querySelector('.done').textContent = run.done + '/' + run.total;
      el.querySelector('.bar i').style.width = (run.total ? 100 * run.done / run.total : 0) + '%';
      el.querySelector('.rate').textContent = run.rate ? run.rate.toFixed(2) + ' img/s' : '–';
      el.querySelector('.eta').textContent = fmtEta(run.eta_seconds);
      el.querySelector('.failed').textContent = run.failed;
      el.querySelector('.npicks').textContent = run.picks;
    }
  } catch (e) {}
}
setInterval(refreshRuns, 5000);
"""


def q(path: str, **params: object) -> str:
    """A same-site URL with its query, escaped for an HTML attribute by the caller."""
    pairs = []
    for key, value in params.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            pairs.append((key, str(v)))
    return path + ("?" + urlencode(pairs) if pairs else "")


def layout(title: str, body: str, *, role: str, csrf: str, nonce: str, scripts: Sequence[str] = (),
           run: str | None = None, lightbox: bool = False) -> str:
    script = "".join(scripts)
    run_attr = f' data-run="{e(run)}"' if run is not None else ""
    box = '<div id="lightbox" hidden><button class="close" type="button">close</button><img alt="full image"></div>' if lightbox else ""
    nav = '<a href="/">runs</a>'
    if run is not None:
        nav += f' · <a href="{e(q("/gallery", run=run))}">gallery</a> · <a href="{e(q("/deliveries", run=run))}">upscaled</a>'
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="csrf" content="{e(csrf)}"><title>{e(title)}</title><style>{CSS}</style></head>'
        f'<body{run_attr}><header><h1>{e(title)}</h1><nav>{nav}</nav><span class="role">{e(role)}</span></header>'
        f'<main>{body}<p id="status" role="status"></p></main>{box}'
        f'<script nonce="{e(nonce)}">{COMMON_JS}{script}</script></body></html>'
    )


def queue_table(entries: Sequence[dict]) -> str:
    """The admin's view of the GPU queue (newest last), or '' when it is empty."""
    if not entries:
        return ""
    import time

    rows = "".join(
        f'<tr><td>#{x["id"]}</td><td>{e(x["status"])}</td><td>{x["done"]}/{x["total"]}</td><td>{e(x["name"])}</td>'
        f'<td>{e(x["who"] or "?")}</td><td>{time.strftime("%m-%d %H:%M", time.localtime(x["submitted_at"]))}</td>'
        f'<td>{e(x["message"] or "")}</td></tr>' for x in entries[-20:])
    return ('<h2>GPU queue</h2><table class="queue"><tr><th>id</th><th>status</th><th>done</th><th>recipe</th>'
            f'<th>who</th><th>submitted</th><th></th></tr>{rows}</table>')


def runs_page(runs: Sequence[dict], queue: Sequence[dict] = (), **kw: str) -> str:
    cards = []
    for run in runs:
        name = run["name"]
        label = run.get("recipe") or name
        if run.get("error"):
            cards.append(f'<div class="run"><b>{e(name)}</b><p class="err">{e(run["error"])}</p></div>')
            continue
        pct = 100 * run["done"] / run["total"] if run["total"] else 0
        rate = f'{run["rate"]:.2f} img/s' if run.get("rate") else "–"
        energy = (f' · <span class="energy">{run["wh_per_image"]:.3f} Wh/image, {run["kwh"]:.4f} kWh</span>'
                  if run.get("wh_per_image") is not None else "")  # shown only when measured, never guessed
        cards.append(
            f'<div class="run" data-run="{e(name)}"><a href="{e(q("/gallery", run=name))}"><b>{e(label)}</b></a>'
            f' <span class="stats">{e(name)}</span><div class="bar"><i style="width:{pct:.1f}%"></i></div>'
            f'<div class="stats"><span class="done">{run["done"]}/{run["total"]}</span> done · '
            f'<span class="rate">{rate}</span> · ETA <span class="eta">{e(fmt_eta(run.get("eta_seconds")))}</span> · '
            f'failed <span class="failed">{run["failed"]}</span> · picks <span class="npicks">{run["picks"]}</span>{energy}'
            f' · <a href="{e(q("/deliveries", run=name))}">upscaled</a></div></div>'
        )
    body = f'<div class="runs">{"".join(cards)}</div>' if cards else "<p>No run folders here yet.</p>"
    return layout("imagegen runs", body + queue_table(queue), scripts=[RUNS_JS], **kw)


def _caption(item: GalleryItem, axes: Sequence[str]) -> str:
    return " · ".join(f"{a} {item.axes.get(a, '(none)')}" for a in axes)


def _varying(items: Sequence[GalleryItem]) -> dict[str, list[str]]:
    values: dict[str, dict[str, None]] = {}
    for item in items:
        for name in item.axes:
            values.setdefault(name, {})
    for item in items:
        for name, seen in values.items():
            seen.setdefault(item.axes.get(name, "(none)"), None)
    return {name: list(seen) for name, seen in values.items() if len(seen) > 1}


def gallery_page(run: str, title: str, items: Sequence[GalleryItem], picks: dict, **kw: str) -> str:
    varying = _varying(items)
    picked = set(picks["picks"])
    notes = picks.get("notes", {})
    filters = "".join(
        f'<label>{e(axis)} <select data-axis="{e(axis)}"><option value="">all</option>'
        + "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in vals) + "</select></label>"
        for axis, vals in varying.items())
    filters += ('<label>picks <select id="filter-picked"><option value="">all</option>'
                '<option value="picked">picked</option><option value="unpicked">not picked</option></select></label>'
                f'<span id="count">{len(picked)} picked</span> <span id="shown"></span>')
    cards = []
    for it in items:
        thumb = q("/file", run=run, kind="thumbs", name=it.thumb) if it.thumb else q("/file", run=run, kind="images", name=it.image)
        full = q("/file", run=run, kind="images", name=it.image)
        on = it.index in picked
        cards.append(
            f'<figure class="card{" picked" if on else ""}" id="job-{it.index}" data-index="{it.index}" '
            f'data-axes="{e(json.dumps(it.axes, ensure_ascii=False))}">'
            f'<a href="{e(full)}" data-full="{e(full)}"><img src="{e(thumb)}" alt="job {it.index}" loading="lazy"></a>'
            f'<figcaption><span class="idx">{it.index}</span>'
            f'<button type="button" class="pick" aria-pressed="{str(on).lower()}">pick</button>'
            f'<button type="button" class="notebtn">note</button>'
            f'<label class="cmp"><input type="checkbox" value="{it.index}">compare</label>'
            f'<span class="cap">{e(_caption(it, list(varying)))}</span>'
            f'<span class="note">{e(notes.get(str(it.index), "")) if on else ""}</span></figcaption></figure>'
        )
    body = (f'<div id="filters">{filters}</div><div id="cards">{"".join(cards) or "<p>No finished images yet.</p>"}</div>'
            '<div id="comparebar" hidden><a class="btn" id="compare" href="#">Compare</a></div>')
    return layout(title, body, run=run, lightbox=True, scripts=[PICKS_JS, GALLERY_JS], **kw)


def compare_page(run: str, title: str, items: Sequence[GalleryItem], picks: dict, **kw: str) -> str:
    axes = list(_varying(items)) or sorted({a for it in items for a in it.axes})
    picked = set(picks["picks"])
    notes = picks.get("notes", {})
    figs = []
    for it in items:
        full = q("/file", run=run, kind="images", name=it.image)
        on = it.index in picked
        figs.append(
            f'<figure class="card{" picked" if on else ""}" data-index="{it.index}">'
            f'<img src="{e(full)}" alt="job {it.index}" data-full="{e(full)}">'
            f'<figcaption><span class="idx">{it.index}</span>'
            f'<button type="button" class="pick" aria-pressed="{str(on).lower()}">pick</button>'
            f'<button type="button" class="notebtn">note</button><span class="cap">{e(_caption(it, axes))}</span>'
            f'<span class="note">{e(notes.get(str(it.index), "")) if on else ""}</span></figcaption></figure>')
    body = f'<p><span id="count">{len(picked)} picked</span></p><div class="compare">{"".join(figs)}</div>'
    return layout(f"compare · {title}", body, run=run, lightbox=True, scripts=[PICKS_JS], **kw)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def deliveries_page(run: str, title: str, items: Sequence[Delivery], **kw: str) -> str:
    figs = []
    for d in items:
        src = q("/file", run=run, kind="upscaled", name=d.name) if d.direct else q("/preview", run=run, name=d.name)
        dims = f"{d.width}×{d.height} px · " if d.width else ""
        figs.append(
            f'<figure><img src="{e(src)}" alt="{e(d.name)}" loading="lazy" data-full="{e(src)}">'
            f'<figcaption><b>{e(d.name)}</b><br>{dims}{_size(d.size)}'
            f'{"" if d.direct else " · preview"} · <a href="{e(q("/file", run=run, kind="upscaled", name=d.name, download=1))}"'
            f' download>download</a></figcaption></figure>')
    body = f'<div class="deliveries">{"".join(figs)}</div>' if figs else (
        "<p>No upscaled deliveries yet: pick images, then <code>imagegen upscale RUN</code>.</p>")
    return layout(f"upscaled · {title}", body, run=run, lightbox=True, **kw)
