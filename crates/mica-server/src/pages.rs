//! Server-rendered pages. Each is a shell with a little inline JavaScript that calls the JSON
//! API, so a hospital system and a person see the same data through the same routes. No
//! external script, font or stylesheet is loaded: the pages work offline.
//!
//! Everything that comes from a model or a person (labels, rationales, notes, names) is put
//! into the page with `textContent`, never as HTML.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use mica_report::html_escape;

use crate::app::{find_run, valid_case_id, App};

const CSS: &str = r#"
:root{--ink:#1d2430;--muted:#5b6575;--line:#d8dde5;--bg:#f5f7fa;--brand:#12355b;--ok:#1b7f4b;--warn:#a35a00;--bad:#b3261e}
*{box-sizing:border-box}[hidden]{display:none!important}body{margin:0;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--ink);background:var(--bg);font-size:15px}
header{background:var(--brand);color:#fff;display:flex;align-items:center;gap:1.5rem;padding:.6rem 1.5rem}
header .brand{font-weight:700;font-size:1.1rem;letter-spacing:.02em}header nav a{color:#cfe0f5;text-decoration:none;margin-right:1rem}
header nav a.active,header nav a:hover{color:#fff;text-decoration:underline}header .ds{margin-left:auto;font-size:.8rem;color:#cfe0f5}header .who{font-size:.85rem}header form{margin:0}
main{max-width:1280px;margin:0 auto;padding:1rem 1.5rem 3rem}h1{font-size:1.4rem;margin:.6rem 0}h2{font-size:1.15rem;margin:1.4rem 0 .6rem}
.notice{background:#eef4fb;border-left:4px solid var(--brand);padding:.5rem .9rem;margin:.6rem 0;color:#22384f;font-size:.9rem}
.drop{border:2px dashed #8aa1bd;border-radius:10px;background:#fff;padding:1.6rem;text-align:center;cursor:pointer;transition:background .15s}
.drop.over{background:#e6f0fb;border-color:var(--brand)}.drop input{display:none}.drop .big{font-size:1.1rem;font-weight:600}
.button,button{background:var(--brand);color:#fff;border:0;border-radius:6px;padding:.45rem .9rem;font-size:.95rem;cursor:pointer}
.button.secondary{background:#fff;color:var(--brand);border:1px solid var(--brand)}
.status{margin:.6rem 0;min-height:1.4em}.status.error{color:var(--bad);font-weight:600}.status.busy{color:var(--muted)}.status.ok{color:var(--ok);font-weight:600}
.case-head{display:grid;grid-template-columns:260px 1fr;gap:1.2rem;align-items:start;background:#fff;border:1px solid var(--line);border-radius:10px;padding:1rem}
.case-head img{width:256px;height:256px;object-fit:contain;background:#000;border-radius:6px;image-rendering:pixelated}
.placeholder{width:256px;height:256px;display:flex;align-items:center;justify-content:center;background:#e9edf2;color:var(--muted);border-radius:6px;padding:1rem;text-align:center;font-size:.85rem}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.25rem .8rem;margin:0;font-size:.9rem}dl.meta dt{color:var(--muted)}dl.meta dd{margin:0;word-break:break-all}
.flag{border-radius:8px;padding:.6rem 1rem;margin:1rem 0;font-weight:600}.flag ul{margin:.3rem 0 0 1.2rem;font-weight:400}
.flag.review{background:#fff4e0;border:2px solid #e0a030;color:#5a3a00}.flag.ok{background:#e8f5ee;border:1px solid #8cc7a6;color:#174d31}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:1rem}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:.9rem 1rem}.card h3{margin:0;font-size:1rem;display:flex;gap:.4rem;align-items:center;flex-wrap:wrap}
.badge{font-size:.7rem;font-weight:700;border-radius:4px;padding:.1rem .35rem;background:#e3e8ef;color:#33415a;text-transform:uppercase}.badge.sim{background:#fde3e1;color:var(--bad)}
.version{color:var(--muted);font-size:.78rem;margin:.2rem 0 .6rem;word-break:break-all}
.suggest .cap{font-size:.75rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}.suggest .label{font-size:1.35rem;font-weight:700}.suggest .label.none{color:var(--bad)}
.bar{height:8px;background:#e9edf2;border-radius:4px;overflow:hidden;margin:.3rem 0}.bar span{display:block;height:100%;background:var(--ok)}.bar.low span{background:#e0a030}
table{border-collapse:collapse;width:100%;font-size:.88rem;background:#fff}th,td{border-bottom:1px solid var(--line);padding:.35rem .5rem;text-align:left;vertical-align:top}th{background:#eef1f5;font-weight:600}
td.num,th.num{text-align:right;white-space:nowrap}.probs{margin-top:.5rem}.probs td{padding:.15rem .4rem}
.gradcam{margin:.6rem 0 0}.gradcam img{width:100%;max-width:256px;border-radius:6px;image-rendering:pixelated}figcaption{font-size:.78rem;color:var(--muted)}
blockquote{margin:.6rem 0 0;padding:.4rem .7rem;background:#f3f5f8;border-left:3px solid #8aa1bd;font-size:.88rem}.err{color:var(--bad);font-size:.85rem;margin-top:.4rem;word-break:break-word}
form.decision{background:#fff;border:1px solid var(--line);border-radius:10px;padding:1rem;display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:.8rem;align-items:end}
form.decision label{display:flex;flex-direction:column;font-size:.85rem;color:var(--muted);gap:.25rem}form.decision .wide{grid-column:1/-1}
select,input[type=text],input[type=password],textarea{font:inherit;padding:.4rem .5rem;border:1px solid #b8c2cf;border-radius:6px;color:var(--ink);background:#fff}textarea{min-height:3.5rem;resize:vertical}
ul.trail{padding-left:1.2rem}.summary{display:flex;gap:1rem;flex-wrap:wrap;margin:.6rem 0}.summary div{background:#fff;border:1px solid var(--line);border-radius:10px;padding:.6rem 1rem;min-width:150px}
.summary b{display:block;font-size:1.5rem}.agree{color:var(--ok);font-weight:700}.disagree{color:var(--bad);font-weight:700}.muted{color:var(--muted)}
.offsite{background:#fff4e0;border:1px solid #e0a030;color:#5a3a00;border-radius:6px;padding:.3rem .5rem;font-size:.8rem;margin:.3rem 0}
.flag.waiting{background:#eef4fb;border:1px solid #8aa1bd;color:#22384f}.flag button{margin-top:.5rem}.suggest .label.pending{color:var(--muted);font-weight:400;font-size:1rem}
.badge.state.answered{background:#e8f5ee;color:var(--ok)}.badge.state.pending{background:#eef4fb;color:var(--brand)}.badge.state.timed-out,.badge.state.failed,.badge.state.not-sent,.badge.state.not-asked{background:#fde3e1;color:var(--bad)}
ul.deid{margin:0;padding-left:1.1rem;columns:2;font-size:.82rem}
.minibar{display:inline-block;width:90px;height:8px;background:#e9edf2;border-radius:4px;vertical-align:middle;margin-left:.4rem;overflow:hidden}.minibar span{display:block;height:100%;background:var(--ok)}
"#;

const COMMON_JS: &str = r#"
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v; else if (k === 'text') e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) { if (c === null || c === undefined) continue; e.append(c instanceof Node ? c : document.createTextNode(String(c))); }
  return e;
}
async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: 'same-origin', headers: { 'Accept': 'application/json' } }, opts || {}));
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) { throw new Error(body && body.error ? body.error.message : ('the server answered HTTP ' + r.status)); }
  return body;
}
function pct(x) { return (x === null || x === undefined) ? '–' : (100 * x).toFixed(1) + ' %'; }
function mb(n) { return (n / 1048576).toFixed(n % 1048576 ? 1 : 0) + ' MB'; }
function wh(x) { if (x === null || x === undefined) return null; if (x === 0) return '0 Wh'; const a = Math.abs(x); return (a >= 0.01 ? x.toFixed(3) : x.toExponential(2)) + ' Wh'; }
function when(iso) { return iso ? iso.replace('T', ' ').replace('Z', ' UTC') : ''; }
function status(msg, kind) { const s = $('status'); s.textContent = msg; s.className = 'status ' + (kind || ''); }
// Who is signed in (from /api/v1/health), shown in the header with a sign-out button.
async function whoami() {
  try {
    const a = (await api('/api/v1/health')).auth || {};
    if (a.user) { $('who').textContent = a.user + ' (' + a.role + ')'; $('who').hidden = false; }
    if (a.signed_in) $('sign-out').hidden = false;
  } catch (_) { /* the page shows its own errors */ }
}
whoami();
"#;

const CASE_JS: &str = r#"
let health = null;
let current = null;
let lastFile = null;
let polling = null;
async function init() {
  try {
    health = await api('/api/v1/health');
    $('panel').textContent = health.classifiers.map(c => c.name).join('  ·  ');
    const tasks = health.tasks || [];
    if (tasks.length > 1) {
      const sel = $('task'); sel.replaceChildren(el('option', { value: '', text: 'from the DICOM header (Modality, Body Part)' }));
      for (const t of tasks) sel.append(el('option', { value: t.name, text: t.name + ' (' + t.modality + ': ' + t.classifiers.map(c => c.name).join(', ') + ')' }));
      $('task-row').hidden = false;
    }
    $('limits').textContent = 'PNG, JPEG or DICOM, up to ' + mb(health.max_upload_bytes) + '. DICOM patient fields are removed before anything is stored.';
  } catch (e) { status(e.message, 'error'); }
  const m = location.pathname.match(/^\/cases\/([0-9a-f]{32})$/);
  if (m) { try { const c = await api('/api/v1/cases/' + m[1]); render(c); follow(c); } catch (e) { status(e.message, 'error'); } }
  // With named identities the server records the signed-in user: no name to type.
  const a = (health && health.auth) || {};
  if (a.identity) { $('reviewer-row').hidden = true; $('reviewer').required = false; $('reviewer').disabled = true; }
  else { const who = localStorage.getItem('mica.reviewer'); if (who) $('reviewer').value = who; }
  if (a.role === 'viewer') { $('decision-form').hidden = true; $('viewer-note').hidden = false; }
}
const drop = $('drop');
drop.addEventListener('click', () => $('file').click());
drop.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); } });
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
$('file').addEventListener('click', (e) => e.stopPropagation());
$('file').addEventListener('change', (e) => { if (e.target.files.length) upload(e.target.files[0]); });

// Answers arrive one by one: the case is polled until every classifier is done.
function follow(c) {
  if (polling) { clearTimeout(polling); polling = null; }
  if (c.complete) return;
  polling = setTimeout(async () => {
    try { const n = await api('/api/v1/cases/' + c.id); if (current && current.id === n.id) { render(n); follow(n); } }
    catch (e) { status(e.message, 'error'); }
  }, 600);
}

async function upload(file, override) {
  lastFile = file;
  if (health && file.size > health.max_upload_bytes) {
    status('Upload refused: ' + file.name + ' is larger than the limit of ' + mb(health.max_upload_bytes) + '.', 'error'); return;
  }
  status('Sending ' + file.name + '…', 'busy');
  const fd = new FormData(); fd.append('file', file, file.name);
  const q = new URLSearchParams();
  if ($('task').value) q.set('task', $('task').value);
  if (override) { q.set('override_modality', 'true'); if (current && current.task) q.set('task', current.task); }
  try {
    const c = await api('/api/v1/classify' + (q.toString() ? '?' + q : ''), { method: 'POST', body: fd });
    history.pushState(null, '', '/cases/' + c.id);
    render(c);
    follow(c);
    status('Case created for ' + file.name + ': each answer appears as soon as it is in.', 'ok');
  } catch (e) { status('Upload refused: ' + e.message, 'error'); }
  finally { $('file').value = ''; }
}

function render(c) {
  current = c;
  $('case').hidden = false;
  $('case').dataset.complete = String(!!c.complete);
  $('case-id').textContent = c.id;
  const fig = $('case-image'); fig.replaceChildren();
  if (c.image.url) fig.append(el('img', { src: c.image.url, alt: 'uploaded image (de-identified pixels)' }));
  else fig.append(el('div', { class: 'placeholder', text: 'The image is no longer held: mica keeps images in memory only for recent cases and never stores them.' }));
  const meta = $('case-meta'); meta.replaceChildren();
  const add = (k, v) => { meta.append(el('dt', { text: k }), el('dd', { text: v })); };
  add('Received', when(c.created));
  if (c.task) add('Task', c.task);
  add('Image', c.image.format.toUpperCase() + ', ' + c.image.width + ' × ' + c.image.height + ' px' + (c.image.frames > 1 ? ' (first of ' + c.image.frames + ' frames)' : ''));
  add('SHA-256 of pixels', c.image.sha256);
  if (c.image.deidentified.length) {
    meta.append(el('dt', { text: 'De-identified (' + c.image.deidentified.length + ' attributes removed before processing)' }),
      el('dd', {}, el('ul', { id: 'deidentified', class: 'deid' }, ...c.image.deidentified.map(a => el('li', { text: a })))));
  }
  add('Labels', c.labels.join(', '));
  add('Review threshold', c.review_threshold.toFixed(2));

  const flag = $('review-flag'); flag.replaceChildren();
  const waiting = c.predictions.filter(p => p.state === 'pending').map(p => p.classifier);
  if (c.modality_mismatch) {
    flag.className = 'flag review mismatch';
    flag.append('⚠ Not classified: the image does not match the task', el('ul', {}, el('li', { text: c.modality_mismatch })));
    if (lastFile) { const b = el('button', { type: 'button', id: 'override', text: 'Classify anyway with task ' + (c.task || '') }); b.addEventListener('click', () => upload(lastFile, true)); flag.append(b); }
  } else if (waiting.length) {
    flag.className = 'flag waiting';
    flag.append('Waiting for ' + waiting.length + ' classifier' + (waiting.length > 1 ? 's' : '') + ': ' + waiting.join(', ') + '. The answers already in are shown below.');
  } else if (c.needs_review) {
    flag.className = 'flag review';
    flag.append('⚠ Needs physician review', el('ul', {}, ...c.review_reasons.map(r => el('li', { text: r }))));
  } else {
    flag.className = 'flag ok';
    flag.append('No review flag: every classifier answered at or above the review threshold, and they agree. The physician still decides.');
  }

  const cards = $('results'); cards.replaceChildren();
  c.predictions.forEach((p, i) => cards.append(card(p, i, c.review_threshold)));

  const sel = $('final-label'); sel.replaceChildren(el('option', { value: '', text: 'choose the final label…' }));
  for (const l of c.labels) sel.append(el('option', { value: l, text: l }));
  if (c.decision) sel.value = c.decision.final_label;
  trail(c.decisions);
  $('decision-status').textContent = '';
}

const STATES = { 'pending': 'waiting for its answer…', 'timed-out': 'no answer in time', 'failed': 'no answer', 'not-sent': 'image not sent', 'not-asked': 'not asked' };
function card(p, i, thr) {
  const head = el('h3', {}, p.classifier, el('span', { class: 'badge', text: p.family }), el('span', { class: 'badge state ' + p.state, text: p.state }), p.simulated ? el('span', { class: 'badge sim', text: 'simulated' }) : null);
  const label = p.suggested_label
    ? el('div', { class: 'label', text: p.suggested_label })
    : el('div', { class: 'label none' + (p.state === 'pending' ? ' pending' : ''), text: STATES[p.state] || ('no answer (' + p.outcome + ')') });
  const sug = el('div', { class: 'suggest' }, el('div', { class: 'cap', text: 'suggested label' }), label);
  const parts = [head, el('div', { class: 'version', text: p.model_version })];
  if (p.sends_image_off_machine) parts.push(el('div', { class: 'offsite', role: 'note', text: '⚠ Sends the image off this machine, to this provider\'s servers (de-identified pixels only).' }));
  parts.push(sug);
  if (p.cascade) parts.push(el('div', { class: 'cascade', role: 'note', text: p.cascade }));
  if (p.state === 'pending') return el('article', { class: 'card prediction pending', 'data-index': String(i), 'data-state': p.state }, ...parts);
  if (p.confidence !== null && p.confidence !== undefined) {
    const low = p.confidence < thr;
    const bar = el('div', { class: 'bar' + (low ? ' low' : '') }, el('span', { style: 'width:' + (100 * p.confidence).toFixed(1) + '%' }));
    parts.push(el('div', { class: 'muted', text: 'confidence ' + pct(p.confidence) + (low ? ' (below threshold)' : '') }), bar);
  }
  const dl = el('dl', { class: 'meta' });
  const add = (k, v) => { if (v !== null && v !== undefined) dl.append(el('dt', { text: k }), el('dd', { text: v })); };
  add('Outcome', p.outcome);
  if (p.state !== 'not-sent' && p.state !== 'not-asked') add('Latency', p.latency_ms.toFixed(1) + ' ms');
  add('Energy', (wh(p.energy_wh) || 'not measured') + ' (' + p.energy_method + ')');
  if (p.tokens) add('Tokens', p.tokens.prompt + ' in / ' + p.tokens.completion + ' out');
  if (p.cost_usd !== null && p.cost_usd !== undefined) add('Cost', '$' + p.cost_usd.toFixed(5));
  parts.push(dl);
  if (p.probabilities) {
    const rows = Object.entries(p.probabilities).sort((a, b) => b[1] - a[1]);
    parts.push(el('table', { class: 'probs' }, ...rows.map(([k, v]) => el('tr', {}, el('td', { text: k }), el('td', { class: 'num', text: pct(v) })))));
  }
  if (p.gradcam_url) {
    const occlusion = (p.overlay_method || '').startsWith('occlusion');
    parts.push(el('figure', { class: 'gradcam' }, el('img', { src: p.gradcam_url, alt: (p.overlay_method || 'Grad-CAM') + ' overlay of ' + p.classifier }), el('figcaption', { text: occlusion
      ? 'Occlusion map (ONNX model: no gradients): where hiding the image lowered the answer\'s probability most (red: most influence).'
      : 'Grad-CAM: where the CNN looked for its answer (red: most influence).' })));
  }
  if (p.rationale) parts.push(el('blockquote', {}, el('b', { text: 'Model rationale: ' }), p.rationale));
  if (p.error) parts.push(el('div', { class: 'err', text: p.error }));
  return el('article', { class: 'card prediction', 'data-index': String(i), 'data-state': p.state }, ...parts);
}

function trail(ds) {
  const ul = $('decision-trail'); ul.replaceChildren();
  if (!ds.length) { ul.append(el('li', { class: 'muted', text: 'No decision recorded yet.' })); return; }
  for (const d of ds) ul.append(el('li', {}, when(d.decided) + ': ', el('b', { text: d.reviewer }), ' set the final label ', el('b', { text: d.final_label }), d.note ? ' (note: ' + d.note + ')' : ''));
}

$('decision-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (!current) return;
  const body = { final_label: $('final-label').value, reviewer: $('reviewer').disabled ? undefined : $('reviewer').value, note: $('note').value || null };
  const s = $('decision-status');
  if (!body.final_label) { s.className = 'status wide error'; s.textContent = 'Choose the final label first.'; return; }
  try {
    const r = await api('/api/v1/cases/' + current.id + '/decision', { method: 'POST', headers: { 'Content-Type': 'application/json', 'Accept': 'application/json' }, body: JSON.stringify(body) });
    if (body.reviewer) localStorage.setItem('mica.reviewer', body.reviewer);
    current = r.case; trail(r.case.decisions);
    s.className = 'status wide ok'; s.textContent = 'Decision recorded: ' + r.decision.final_label + ' by ' + r.decision.reviewer + ' (it now counts on the monitoring page).';
  } catch (err) { s.className = 'status wide error'; s.textContent = err.message; }
});
window.addEventListener('popstate', () => location.reload());
init();
"#;

const MONITORING_JS: &str = r#"
async function init() {
  let m;
  try { m = await api('/api/v1/monitoring'); } catch (e) { status(e.message, 'error'); return; }
  $('n-cases').textContent = m.cases; $('n-decided').textContent = m.decided; $('n-waiting').textContent = m.awaiting_review;
  const models = $('models'); models.replaceChildren();
  if (!m.models.length) models.append(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'No decided case yet: agreement appears once a physician records a final label.' })));
  for (const x of m.models) {
    models.append(el('tr', { class: 'model-row' }, el('td', { text: x.classifier }), el('td', { class: 'muted', text: x.model_version }),
      el('td', { class: 'num', text: x.decided }), el('td', { class: 'num', text: x.agreed }), el('td', { class: 'num', text: x.no_answer }),
      el('td', { class: 'num' }, pct(x.agreement), el('span', { class: 'minibar' }, el('span', { style: 'width:' + (100 * x.agreement).toFixed(0) + '%' })))));
  }
  const days = $('days'); days.replaceChildren();
  for (const x of m.models) for (const d of x.days) {
    days.append(el('tr', {}, el('td', { text: d.day }), el('td', { text: x.classifier }), el('td', { class: 'num', text: d.decided }), el('td', { class: 'num', text: d.agreed }), el('td', { class: 'num', text: pct(d.agreement) })));
  }
  if (!days.children.length) days.append(el('tr', {}, el('td', { colspan: '5', class: 'muted', text: 'Nothing yet.' })));
  const recent = $('recent'); recent.replaceChildren();
  for (const r of m.recent_decisions) {
    const sug = el('td', {});
    r.suggestions.forEach((s, i) => { if (i) sug.append(el('br')); sug.append(s.classifier + ': ' + (s.suggested_label || 'no answer') + ' ', el('span', { class: s.agrees ? 'agree' : 'disagree', text: s.agrees ? '✓ agrees' : '✗ differs' })); });
    recent.append(el('tr', { class: 'decision-row' }, el('td', { text: when(r.decision.decided) }), el('td', {}, el('a', { href: r.case_url, text: r.case_id.slice(0, 12) + '…' })),
      el('td', { text: r.decision.reviewer }), el('td', {}, el('b', { text: r.decision.final_label })), sug, el('td', { text: r.decision.note || '' })));
  }
  if (!recent.children.length) recent.append(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'No decision recorded yet.' })));
}
init();
"#;

const RUNS_JS: &str = r#"
async function init() {
  let r;
  try { r = await api('/api/v1/runs'); } catch (e) { status(e.message, 'error'); return; }
  const body = $('runs'); body.replaceChildren();
  if (!r.runs.length) { body.append(el('tr', {}, el('td', { colspan: '7', class: 'muted', text: 'No runs in the results store yet: mica compare indexes every finished run, and mica runs add RUN_DIR indexes one.' }))); return; }
  for (const x of r.runs) {
    body.append(el('tr', { class: 'run-row' }, el('td', { class: 'num', text: x.id }), el('td', {}, el('a', { href: x.report_url, text: x.name }), x.simulated ? el('span', { class: 'badge sim', text: 'simulated' }) : null),
      el('td', { text: when(x.created || x.indexed) }), el('td', { class: 'muted', text: x.dataset || '' }), el('td', { class: 'num', text: x.classifiers }),
      el('td', { text: x.best_classifier || '–' }), el('td', { class: 'num', text: pct(x.best_accuracy) })));
  }
}
init();
"#;

fn nav(active: &str) -> String {
    let link = |href: &str, key: &str, text: &str| {
        format!("<a href=\"{href}\"{}>{text}</a>", if key == active { " class=\"active\"" } else { "" })
    };
    format!(
        "<header><span class=\"brand\">mica</span><nav>{}{}{}</nav><span class=\"ds\">Decision support: suggestions for a physician, not a diagnosis</span><span class=\"who\" id=\"who\" hidden></span><form method=\"post\" action=\"/sign-out\" id=\"sign-out\" hidden><button type=\"submit\" class=\"button secondary\">Sign out</button></form></header>",
        link("/", "case", "Case view"),
        link("/monitoring", "monitoring", "Monitoring"),
        link("/runs", "runs", "Runs")
    )
}

fn layout(title: &str, active: &str, body: &str, script: &str) -> Html<String> {
    let script = if script.is_empty() {
        String::new()
    } else {
        format!("<script>{COMMON_JS}{script}</script>")
    };
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{} · mica</title><style>{CSS}</style></head><body>{}<main>{body}</main>{script}</body></html>\n",
        html_escape(title),
        nav(active)
    ))
}

fn case_html() -> Html<String> {
    let body = r#"
<h1>Case view</h1>
<div class="notice">Upload one image; every configured classifier answers side by side. Their labels are <b>suggestions</b> for the physician, who records the final label. Nothing on this page is a diagnosis.</div>
<p class="muted">Classifiers: <span id="panel">…</span></p>
<div id="drop" class="drop" tabindex="0" role="button" aria-label="Upload an image">
  <div class="big">Drop a PNG, JPEG or DICOM image here</div>
  <p>or <label for="file" class="button secondary">choose a file</label><input type="file" id="file" name="file" accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom"></p>
  <div class="muted" id="limits"></div>
</div>
<p id="task-row" hidden><label>Task <select id="task"></select></label></p>
<div id="status" class="status" role="status" aria-live="polite"></div>
<section id="case" hidden>
  <h2>Case <code id="case-id"></code></h2>
  <div class="case-head"><figure id="case-image" style="margin:0"></figure><dl id="case-meta" class="meta"></dl></div>
  <div id="review-flag" role="note"></div>
  <h2>Suggestions</h2>
  <div id="results" class="cards"></div>
  <h2>Physician's decision</h2>
  <p id="viewer-note" class="notice" hidden>You are signed in as a viewer: you can read cases, but only physicians record decisions.</p>
  <form id="decision-form" class="decision">
    <label>Final label<select id="final-label" required></select></label>
    <label id="reviewer-row">Reviewer<input type="text" id="reviewer" maxlength="120" required autocomplete="name" placeholder="your name"></label>
    <label class="wide">Note (optional)<textarea id="note" maxlength="4000" placeholder="e.g. why the final label differs from the suggestions"></textarea></label>
    <div><button type="submit" id="decide">Record decision</button></div>
    <div id="decision-status" class="status wide" role="status" aria-live="polite"></div>
  </form>
  <h2>Audit trail</h2>
  <ul id="decision-trail" class="trail"></ul>
</section>
"#;
    layout("Case view", "case", body, CASE_JS)
}

pub async fn case_page() -> Html<String> {
    case_html()
}

pub async fn case_page_for(Path(id): Path<String>) -> Response {
    if !valid_case_id(&id) {
        return not_found_page().into_response();
    }
    case_html().into_response()
}

pub async fn monitoring_page() -> Html<String> {
    let body = r#"
<h1>Monitoring: agreement of each model with the physicians</h1>
<div class="notice">For every case with a recorded decision, each model's suggestion is compared with the physician's latest final label. A model that gave no label counts as disagreeing. Days are UTC days of the decision.</div>
<div id="status" class="status"></div>
<div class="summary"><div>Cases<b id="n-cases">–</b></div><div>Decided<b id="n-decided">–</b></div><div>Flagged, awaiting review<b id="n-waiting">–</b></div></div>
<h2>Per model</h2>
<table><thead><tr><th>Model</th><th>Version</th><th class="num">Decided</th><th class="num">Agreed</th><th class="num">No answer</th><th class="num">Agreement</th></tr></thead><tbody id="models"></tbody></table>
<h2>Over time</h2>
<table><thead><tr><th>Day (UTC)</th><th>Model</th><th class="num">Decided</th><th class="num">Agreed</th><th class="num">Agreement</th></tr></thead><tbody id="days"></tbody></table>
<h2>Recent decisions</h2>
<table><thead><tr><th>When</th><th>Case</th><th>Reviewer</th><th>Final label</th><th>Suggestions</th><th>Note</th></tr></thead><tbody id="recent"></tbody></table>
"#;
    layout("Monitoring", "monitoring", body, MONITORING_JS)
}

pub async fn runs_page() -> Html<String> {
    let body = r#"
<h1>Runs</h1>
<div class="notice">Every comparison run in the results store, newest first. Open one for its full report: accuracy with confidence intervals, energy and CO2 with their method, cost, latency, calibration.</div>
<div id="status" class="status"></div>
<table><thead><tr><th class="num">Id</th><th>Run</th><th>Created</th><th>Dataset</th><th class="num">Classifiers</th><th>Best</th><th class="num">Accuracy</th></tr></thead><tbody id="runs"></tbody></table>
"#;
    layout("Runs", "runs", body, RUNS_JS)
}

/// A run's report, rendered by mica-report from its run directory (read only; nothing is
/// written there), under the app's navigation.
pub async fn run_report_page(State(app): State<App>, Path(id): Path<String>) -> Response {
    let run = match find_run(&app, &id).await {
        Ok(r) => r,
        Err(e) => return message_page(StatusCode::NOT_FOUND, "Run not found", &e.message),
    };
    let dir = std::path::PathBuf::from(&run.run_dir);
    let name = run.name.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let rd = mica_report::RunDir::open(&dir)?;
        let cmp = mica_report::Comparison::build(&rd);
        let plots = mica_report::render::make_plots(&rd, &cmp)?;
        Ok::<_, mica_report::ReportError>(mica_report::render::html(&cmp, &plots))
    })
    .await;
    match rendered {
        Ok(Ok(html)) => {
            let bar = format!(
                "<div style=\"background:#12355b;color:#fff;padding:.5rem 1rem;margin:-2rem -1rem 1rem;font-family:system-ui,sans-serif\"><a href=\"/runs\" style=\"color:#fff\">← all runs</a> · run {} <b>{}</b> · <a href=\"/\" style=\"color:#cfe0f5\">case view</a> · <a href=\"/monitoring\" style=\"color:#cfe0f5\">monitoring</a></div>",
                run.id,
                html_escape(&name)
            );
            let html = match html.find("<body>") {
                Some(i) => format!("{}{bar}{}", &html[..i + 6], &html[i + 6..]),
                None => html,
            };
            Html(html).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!("run {}: report not rendered: {e}", run.id);
            message_page(
                StatusCode::NOT_FOUND,
                "Report unavailable",
                &format!("Run {} `{}` is in the results store, but its run directory can no longer be read as a finished run.", run.id, name),
            )
        }
        Err(e) => message_page(StatusCode::INTERNAL_SERVER_ERROR, "Report failed", &format!("rendering failed: {e}")),
    }
}

fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!("<h1>{}</h1><p>{}</p><p><a href=\"/\">Case view</a> · <a href=\"/runs\">Runs</a></p>", html_escape(title), html_escape(message));
    (status, layout(title, "", &body, "")).into_response()
}

pub fn not_found_page() -> Response {
    message_page(StatusCode::NOT_FOUND, "Not found", "There is no page here.")
}

/// What the sign-in form asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInKind {
    /// A user name and secret (`--users`).
    Users,
    /// The shared access token (`MICA_SERVE_TOKEN`).
    Token,
    /// Nothing to sign in to (open server, or identity from a proxy).
    None,
}

/// The sign-in form. It is POSTed (the secret never lands in an address, a log or the
/// history); `next` is a local path already checked by the caller and is escaped here anyway.
pub fn sign_in_page(kind: SignInKind, next: &str, error: Option<&str>) -> Html<String> {
    let err = error
        .map(|e| format!("<div class=\"status error\" role=\"alert\" id=\"sign-in-error\">{}</div>", html_escape(e)))
        .unwrap_or_default();
    let fields = match kind {
        SignInKind::Users => "<label>User name<input type=\"text\" name=\"name\" id=\"name\" required autocomplete=\"username\" maxlength=\"120\"></label>\
             <label>Secret<input type=\"password\" name=\"secret\" id=\"secret\" required autocomplete=\"current-password\"></label>",
        SignInKind::Token => "<label>Access token<input type=\"password\" name=\"token\" id=\"token\" required autocomplete=\"current-password\"></label>",
        SignInKind::None => "",
    };
    let body = if kind == SignInKind::None {
        format!("<h1>Sign in</h1>{err}<div class=\"notice\">This server does not use a sign-in form: it is open, or the hospital's proxy in front of it identifies you.</div><p><a href=\"/\">Case view</a></p>")
    } else {
        format!(
            "<h1>Sign in</h1>{err}<div class=\"notice\">{}</div>\
             <form method=\"post\" action=\"/sign-in\" class=\"decision\" id=\"sign-in-form\"><input type=\"hidden\" name=\"next\" value=\"{}\">{fields}<div><button type=\"submit\" id=\"sign-in\">Sign in</button></div></form>",
            if kind == SignInKind::Users {
                "Sign in with the name and secret your administrator gave you. Your name is recorded with every decision you make."
            } else {
                "This mica server requires its access token (MICA_SERVE_TOKEN on the server)."
            },
            html_escape(next)
        )
    };
    layout("Sign in", "", &body, "")
}
