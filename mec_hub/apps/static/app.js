"use strict";
// The neighbour browser: a paged grid of the rows. A row of the grid, "more like this" on a result,
// or an uploaded image lists the k nearest rows beside the query; a result opens full size.
const PAGE = 60;
let offset = 0;
let total = 0;
let latest = 0; // the number of the latest query: the answer to an older one is dropped
let queryURL = null; // the object URL of the uploaded image on show (revoked once it is not)
let opener = null; // the element focused again when the full-size view closes

const $ = (id) => document.getElementById(id);

function say(text, isError = false) {
  $("message").textContent = text || "";
  $("message").classList.toggle("error", Boolean(text) && isError);
}

function k() { return Math.max(1, parseInt($("k").value, 10) || 10); }

async function getJSON(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function element(tag, properties, ...children) {
  const made = Object.assign(document.createElement(tag), properties);
  made.append(...children);
  return made;
}

function button(className, label, content, action) {
  const made = element("button", { type: "button", className }, content);
  made.setAttribute("aria-label", label);
  made.addEventListener("click", action);
  return made;
}

function thumbnail(row, path) {
  return element("img", { src: `/thumb/${row}`, alt: path, loading: "lazy" });
}

function figure(row, path) {
  const made = element("figure", { className: "cell", title: path });
  made.dataset.row = row;
  return made;
}

// A cell of the grid: its picture lists the row's neighbours.
function rowCell(r) {
  const cell = figure(r.row, r.path);
  cell.append(
    button("pick", `neighbours of #${r.row} ${r.path}`, thumbnail(r.row, r.path), () => showNeighbours(r.row)),
    element("figcaption", {}, `#${r.row} ${r.path}`),
  );
  return cell;
}

// A result: its picture opens full size; "more like this" lists its own neighbours.
function resultCell(hit, queryRow) {
  const cell = figure(hit.row, hit.path);
  if (hit.row === queryRow) cell.classList.add("same");
  const name = `#${hit.row} ${hit.path}`;
  cell.append(
    button("open", `open ${name} full size`, thumbnail(hit.row, hit.path),
      (event) => openViewer(`/image/${hit.row}`, name, event.currentTarget)),
    element("figcaption", {}, element("span", { className: "score" }, hit.score.toFixed(4)), ` ${name}`),
    button("more", `more like this: ${name}`, "More like this", () => showNeighbours(hit.row)),
  );
  return cell;
}

// The query beside its neighbours: `src` its picture, `full` the URL of its full-size view.
function queryCell(src, full, name) {
  const picture = element("img", { src, alt: `query: ${name}` });
  return [
    button("open", `open the query ${name} full size`, picture, (event) => openViewer(full, name, event.currentTarget)),
    element("figcaption", {}, "query: ", element("span", { className: "query-name" }, name)),
  ];
}

function keepQueryURL(url) {
  if (queryURL && queryURL !== url) URL.revokeObjectURL(queryURL);
  queryURL = url;
}

function clearResults() {
  $("results").hidden = true;
  $("results-title").textContent = "";
  $("query").replaceChildren();
  delete $("query").dataset.row;
  $("neighbours").replaceChildren();
  keepQueryURL(null);
}

function showResults(title, hits, query) {
  $("results-title").textContent = title;
  $("query").replaceChildren(...queryCell(query.src, query.full, query.name));
  if (query.row === null) delete $("query").dataset.row;
  else $("query").dataset.row = query.row;
  $("neighbours").replaceChildren(...hits.map((hit) => resultCell(hit, query.row)));
  keepQueryURL(query.url || null);
  $("results").hidden = false;
  $("results").scrollIntoView({ behavior: "instant", block: "start" });
  // The button that asked may be gone (a result's "more like this"): keyboard users go on from the title.
  $("results-title").focus({ preventScroll: true });
}

// Runs one query: `ask()` is its answer (JSON), `shown(answer)` the query shown beside the neighbours
// ({row, src, full, name}); `what` names it in a failure; `url` is the query's object URL, if any.
async function runQuery(what, ask, shown, url = null) {
  const mine = ++latest;
  say(`searching ${what}...`);
  try {
    const answer = await ask();
    if (mine !== latest) throw new Error("superseded");
    const query = { ...shown(answer), url };
    say("");
    showResults(`${answer.neighbours.length} nearest to ${query.name}`, answer.neighbours, query);
  } catch (error) {
    if (url && url !== queryURL) URL.revokeObjectURL(url);
    if (mine !== latest) return;
    clearResults();
    say(`Could not search ${what}: ${error.message}`, true);
  }
}

function showNeighbours(row) {
  return runQuery(
    `the neighbours of row ${row}`,
    async () => getJSON(await fetch(`/api/neighbours?row=${row}&k=${k()}`)),
    (answer) => ({ row, src: `/thumb/${row}`, full: `/image/${row}`, name: `#${row} ${answer.query.path}` }),
  );
}

function searchFile(file) {
  if (!file) return undefined;
  const url = URL.createObjectURL(file);
  return runQuery(
    `with ${file.name}`,
    async () => getJSON(await fetch(`/api/search?k=${k()}`, {
      // The server takes an upload only in this form: a custom header (which another site's page
      // cannot send without the server's consent) and the bytes as application/octet-stream.
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream", "X-Requested-With": "mec-hub" },
    })),
    () => ({ row: null, src: url, full: url, name: file.name }),
    url,
  );
}

// The full-size view: a modal dialog; Escape, its Close button or a click beside the picture closes it,
// and the focus goes back to the button that opened it.
function openViewer(src, name, from) {
  opener = from || document.activeElement;
  $("viewer-caption").textContent = name;
  $("viewer-image").alt = name;
  $("viewer-image").src = src;
  $("viewer").showModal();
  $("viewer-close").focus();
}

$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) $("viewer").close(); });
$("viewer").addEventListener("close", () => {
  $("viewer-image").removeAttribute("src");
  if (opener && opener.isConnected) opener.focus();
  opener = null;
});
$("viewer-image").addEventListener("error", () => {
  if ($("viewer-image").getAttribute("src")) $("viewer-caption").textContent += " (no image to show)";
});

async function loadPage(start) {
  try {
    const page = await getJSON(await fetch(`/api/rows?offset=${start}&limit=${PAGE}`));
    offset = page.offset;
    total = page.total;
    $("grid").replaceChildren(...page.rows.map(rowCell));
    $("page").textContent = `rows ${offset + 1}-${offset + page.rows.length} of ${total}`;
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= total;
  } catch (error) { say(error.message, true); }
}

$("prev").addEventListener("click", () => loadPage(Math.max(0, offset - PAGE)));
$("next").addEventListener("click", () => loadPage(offset + PAGE));
$("upload").addEventListener("change", (event) => {
  searchFile(event.target.files[0]);
  event.target.value = ""; // choosing the same file again searches again
});
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
}).catch((error) => say(error.message, true));
loadPage(0);
