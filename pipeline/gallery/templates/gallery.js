// The gallery's behaviour: filters and grouping over the grid, the clip panel, hover-scrub over each
// clip's spritesheet, and keyboard review (j/k move, a approve, r reject, n note) posted to api/reviews.
const CLIPS = new Map(JSON.parse(document.getElementById("clips-data").textContent).map(c => [c.id, c]));
const grid = document.getElementById("grid");
const panel = document.getElementById("panel");
const elements = [...grid.querySelectorAll(".clip")];
let selected = null;
const provenance = new Map();

function esc(text) {
  const d = document.createElement("div");
  d.textContent = text == null ? "" : String(text);
  return d.innerHTML;
}

function facetValue(clip, key) {
  if (key.startsWith("columns.")) return clip.columns[key.slice(8)] ?? "";
  return String(clip[key]);
}

// -- filters and grouping ------------------------------------------------------------------------
function checkedValues() {
  const wanted = new Map();
  for (const box of document.querySelectorAll("#filters input[type=checkbox]:checked")) {
    if (!wanted.has(box.dataset.facet)) wanted.set(box.dataset.facet, new Set());
    wanted.get(box.dataset.facet).add(box.value);
  }
  return wanted;
}

function applyFilters() {
  const wanted = checkedValues();
  let shown = 0;
  for (const el of elements) {
    const clip = CLIPS.get(el.dataset.clipId);
    const ok = [...wanted].every(([key, values]) => values.has(facetValue(clip, key)));
    el.hidden = !ok;
    shown += ok;
  }
  document.getElementById("shown-count").textContent = shown;
  regroup();
}

function regroup() {
  const key = document.getElementById("group-by").value;
  grid.querySelectorAll(".group-head").forEach(h => h.remove());
  if (!key) { elements.forEach(el => grid.appendChild(el)); return; }
  const groups = new Map();
  for (const el of elements) {
    const value = facetValue(CLIPS.get(el.dataset.clipId), key);
    if (!groups.has(value)) groups.set(value, []);
    groups.get(value).push(el);
  }
  for (const [value, members] of [...groups].sort((a, b) => b[1].length - a[1].length)) {
    const head = document.createElement("div");
    const visible = members.filter(el => !el.hidden).length;
    head.className = "group-head";
    head.hidden = visible === 0;
    head.innerHTML = `${esc(value || "(empty)")} <span class="count">${visible}</span>`;
    grid.appendChild(head);
    members.forEach(el => grid.appendChild(el));
  }
}

document.querySelectorAll("#filters input[type=checkbox]").forEach(box => box.addEventListener("change", applyFilters));
document.getElementById("group-by").addEventListener("change", regroup);

// -- hover-scrub over the spritesheet ------------------------------------------------------------
for (const el of elements) {
  const frame = el.querySelector(".frame");
  const clip = CLIPS.get(el.dataset.clipId);
  if (clip.still) continue;
  const thumb = frame.style.backgroundImage;
  frame.addEventListener("mousemove", event => {
    const [cols, rows, gap] = clip.sprite_grid;
    const box = frame.getBoundingClientRect();
    const scale = box.width / clip.width;
    const tile = Math.min(cols * rows - 1, Math.floor((event.clientX - box.left) / box.width * cols * rows));
    const col = tile % cols, row = Math.floor(tile / cols);
    frame.style.backgroundImage = `url("${frame.dataset.sprite}")`;
    frame.style.backgroundSize = `${(cols * (clip.width + gap) - gap) * scale}px ${(rows * (clip.height + gap) - gap) * scale}px`;
    frame.style.backgroundPosition = `${-col * (clip.width + gap) * scale}px ${-row * (clip.height + gap) * scale}px`;
    el.dataset.scrubTile = tile;
  });
  frame.addEventListener("mouseleave", () => {
    frame.style.backgroundImage = thumb;
    frame.style.backgroundSize = "";
    frame.style.backgroundPosition = "";
  });
}

// -- the panel -----------------------------------------------------------------------------------
function player(clip) {
  const src = BASE + clip.media, poster = BASE + clip.thumbnail;
  if (clip.still) return `<img class="still" src="${esc(src)}" alt="${esc(clip.id)}">`;
  if (clip.playable) {
    return `<video src="${esc(src)}" poster="${esc(poster)}" controls autoplay muted loop playsinline></video>`;
  }
  return `<img class="still" src="${esc(poster)}" alt="${esc(clip.id)}">`;
}

function provenanceText(report) {
  if (!report) return STATIC ? "run <code>reel verify</code> on the file" : "checking…";
  if (report.error) return `<span class="prov-bad">${esc(report.error)}</span>`;
  const parts = [report.watermark ? `<span class="prov-ok">watermark found</span> (score ${report.score.toFixed(2)})`
                                  : `<span class="prov-bad">no watermark</span>`];
  if (report.tags_model) parts.push(`tags: ${esc(report.tags_model)}`);
  if (report.caption_matches !== null) parts.push(report.caption_matches ? "caption hash matches" : "caption hash differs");
  parts.push(report.c2pa ? `C2PA ${esc(report.c2pa)}` : "no C2PA manifest");
  return parts.join(" · ");
}

function showPanel(clip) {
  const timings = Object.entries(clip.timings).map(([k, v]) => `${k} ${v}s`).join(", ");
  const columns = Object.entries(clip.columns).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
  const master = clip.codec === "ffv1"
    ? `<p class="note-master">FFV1 lossless master (Matroska): browsers do not play it; the poster is its
       thumbnail. <a href="${esc(BASE + clip.media)}" download>Download the master</a>.</p>` : "";
  panel.innerHTML = `
    <div class="player">${player(clip)}</div>${master}
    <h2>${esc(clip.id)}</h2>
    <div class="actions"><button class="approve" data-verdict="approved">Approve <kbd>a</kbd></button>
      <button class="reject" data-verdict="rejected">Reject <kbd>r</kbd></button></div>
    <div class="verdict-meta"></div>
    <textarea id="note" placeholder="note (n, then Enter to save)">${esc(clip.note)}</textarea>
    <p class="prompt-text">${esc(clip.prompt)}</p>
    <p class="caption-text">${esc(clip.caption)}</p>
    <dl>
      <dt>seed</dt><dd>${esc(clip.seed)}</dd>
      <dt>model</dt><dd>${esc(clip.model)}</dd>
      <dt>mode</dt><dd>${esc(clip.mode)}</dd>
      <dt>size</dt><dd>${esc(clip.size)} · ${esc(clip.frames)} frames at ${esc(clip.fps)} fps (${esc(clip.seconds)} s)</dd>
      <dt>sampling</dt><dd>${esc(clip.steps)} steps, guidance ${esc(clip.guidance)}${clip.dtype ? ", " + esc(clip.dtype) : ""}</dd>
      <dt>file</dt><dd>${esc(clip.media)} (${esc(clip.codec)})</dd>
      <dt>timings</dt><dd>${esc(timings)}</dd>
      <dt>provenance</dt><dd id="provenance">${provenanceText(provenance.get(clip.id))}</dd>
      <dt>rendered</dt><dd>${esc(clip.created_at)}</dd>
      ${columns}
    </dl>`;
  showVerdict(clip);
  panel.querySelectorAll(".actions button").forEach(b => b.addEventListener("click", () => review(clip, b.dataset.verdict)));
  const note = panel.querySelector("#note");
  note.addEventListener("keydown", event => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); review(clip, null, note.value); note.blur(); }
    if (event.key === "Escape") note.blur();
  });
  if (!STATIC && !provenance.has(clip.id)) {
    fetch(`api/clips/${encodeURIComponent(clip.id)}/provenance`).then(r => r.json()).then(report => {
      provenance.set(clip.id, report);
      if (selected === clip.id) document.getElementById("provenance").innerHTML = provenanceText(report);
    });
  }
}

// the panel's verdict, buttons and note, updated in place (a note being typed is left alone)
function showVerdict(clip) {
  panel.querySelector(".approve").classList.toggle("on", clip.review === "approved");
  panel.querySelector(".reject").classList.toggle("on", clip.review === "rejected");
  const by = clip.reviewer ? " by " + esc(clip.reviewer) : "", at = clip.reviewed_at ? " · " + esc(clip.reviewed_at) : "";
  const note = STATIC && clip.note ? "<br>note: " + esc(clip.note) : "";
  panel.querySelector(".verdict-meta").innerHTML = (clip.review === "none" ? "not reviewed" : esc(clip.review)) + by + at + note;
  const textarea = panel.querySelector("#note");
  if (document.activeElement !== textarea) textarea.value = clip.note;
}

function select(el) {
  if (!el) return;
  elements.forEach(e => e.classList.toggle("selected", e === el));
  selected = el.dataset.clipId;
  el.focus({preventScroll: true});
  el.scrollIntoView({block: "nearest"});
  showPanel(CLIPS.get(selected));
}

elements.forEach(el => el.addEventListener("click", () => select(el)));

// -- review --------------------------------------------------------------------------------------
function recount() {
  const counts = {none: 0, approved: 0, rejected: 0};
  CLIPS.forEach(c => counts[c.review]++);
  for (const [state, n] of Object.entries(counts)) {
    const cell = document.querySelector(`[data-facet-count="review"][data-value="${state}"]`);
    if (cell) cell.textContent = n;
  }
  document.getElementById("approved-count").textContent = counts.approved;
  document.getElementById("rejected-count").textContent = counts.rejected;
}

// verdicts go out one at a time, in key order: a note typed right after "a" is saved with "approved"
let pending = Promise.resolve();
function review(clip, verdict, note) {
  if (STATIC) return;
  pending = pending.then(() => send(clip, verdict ?? clip.review, note)).catch(error => alert(error));
}

async function send(clip, verdict, note) {
  const reviewer = document.getElementById("reviewer").value.trim();
  if (reviewer) localStorage.setItem("reel-gallery-reviewer", reviewer);
  const response = await fetch("api/reviews", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({id: clip.id, verdict, note: note ?? clip.note, reviewer}),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  Object.assign(clip, {review: body.verdict, note: body.note, reviewer: body.reviewer, reviewed_at: body.time});
  grid.querySelector(`[data-clip-id="${CSS.escape(clip.id)}"]`).dataset.review = body.verdict;
  recount();
  if (selected === clip.id) showVerdict(clip);
  applyFilters();
}

function move(step) {
  const visible = elements.filter(el => !el.hidden);
  if (!visible.length) return;
  // the visible order on the page (grouping moves elements)
  visible.sort((a, b) => (a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING) ? -1 : 1);
  const at = visible.findIndex(el => el.dataset.clipId === selected);
  select(visible[at < 0 ? 0 : Math.max(0, Math.min(visible.length - 1, at + step))]);
}

document.addEventListener("keydown", event => {
  if (event.target.closest("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
  const clip = selected && CLIPS.get(selected);
  if (event.key === "j") move(1);
  else if (event.key === "k") move(-1);
  else if (STATIC || !clip) return;
  else if (event.key === "a") review(clip, "approved");
  else if (event.key === "r") review(clip, "rejected");
  else if (event.key === "n") { event.preventDefault(); panel.querySelector("#note").focus(); }
});

if (!STATIC) {
  const saved = localStorage.getItem("reel-gallery-reviewer");
  if (saved) document.getElementById("reviewer").value = saved;
}
