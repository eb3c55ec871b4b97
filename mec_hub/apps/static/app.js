"use strict";
// The neighbour browser: a paged grid of the rows; a click or an uploaded image lists the k nearest rows.
const PAGE = 60;
let offset = 0;
let total = 0;

const $ = (id) => document.getElementById(id);

function say(text) { $("message").textContent = text || ""; }

function k() { return Math.max(1, parseInt($("k").value, 10) || 10); }

async function getJSON(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function cell(row, path, caption, extraClass) {
  const figure = document.createElement("figure");
  figure.className = "cell" + (extraClass ? " " + extraClass : "");
  figure.dataset.row = row;
  figure.title = path;
  const img = document.createElement("img");
  img.src = `/thumb/${row}`;
  img.alt = path;
  img.loading = "lazy";
  const text = document.createElement("figcaption");
  text.innerHTML = caption;
  figure.append(img, text);
  figure.addEventListener("click", () => showNeighbours(row));
  return figure;
}

function escapeHTML(text) {
  const div = document.createElement("div");
  div.textContent = text;
  return div.innerHTML;
}

async function loadPage(start) {
  try {
    const page = await getJSON(await fetch(`/api/rows?offset=${start}&limit=${PAGE}`));
    offset = page.offset;
    total = page.total;
    const grid = $("grid");
    grid.replaceChildren(...page.rows.map((r) => cell(r.row, r.path, `#${r.row} ${escapeHTML(r.path)}`)));
    $("page").textContent = `rows ${offset + 1}-${offset + page.rows.length} of ${total}`;
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= total;
  } catch (error) { say(error.message); }
}

function showResults(title, hits, queryRow) {
  $("results-title").textContent = title;
  $("neighbours").replaceChildren(...hits.map((h) => cell(
    h.row, h.path,
    `<span class="score">${h.score.toFixed(4)}</span> #${h.row} ${escapeHTML(h.path)}`,
    h.row === queryRow ? "query" : "",
  )));
  $("results").hidden = false;
  $("results").scrollIntoView({ behavior: "instant", block: "start" });
}

async function showNeighbours(row) {
  say("");
  try {
    const answer = await getJSON(await fetch(`/api/neighbours?row=${row}&k=${k()}`));
    showResults(`${answer.neighbours.length} nearest to row ${row} (${answer.query.path})`, answer.neighbours, row);
  } catch (error) { say(error.message); }
}

async function searchFile(file) {
  if (!file) return;
  say(`searching with ${file.name}...`);
  try {
    const answer = await getJSON(await fetch(`/api/search?k=${k()}`, {
      // The server takes an upload only in this form: a custom header (which another site's page
      // cannot send without the server's consent) and the bytes as application/octet-stream.
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream", "X-Requested-With": "mec-hub" },
    }));
    say("");
    showResults(`${answer.neighbours.length} nearest to ${file.name}`, answer.neighbours, null);
  } catch (error) { say(error.message); }
}

$("prev").addEventListener("click", () => loadPage(Math.max(0, offset - PAGE)));
$("next").addEventListener("click", () => loadPage(offset + PAGE));
$("upload").addEventListener("change", (event) => searchFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchFile(event.dataTransfer.files[0]);
});
fetch("/api/info").then(getJSON).then((info) => {
  $("info").textContent = `${info.file}: ${info.rows} rows, ${info.dim}-d, ${info.search} search`;
}).catch((error) => say(error.message));
loadPage(0);
