// ZeroShot Server's web page: build a classifier or detector from words, see it work on your images, deploy it.
// Plain JS, no framework, no build step. Live results deploy a *draft* (one per kind, its id kept in localStorage and
// updated on every change) and run /classify or /detect with it.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000"];
const DEBOUNCE_MS = 400;
const KEY_STORE = "zss.apiKey";
const DRAFT_STORE = "zss.draft.";

const state = {
  settings: { allow_url_fetch: false, detector_enabled: true },
  images: [], // {id, name, src (object URL or URL), blob (File) | url (string), el, result, error}
  nextImage: 1,
  timer: null,
  controller: null,
  lastDeployed: null, // JSON of the config the draft holds now
};

// -- HTTP: the API key, the envelope -----------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = $("#api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const res = await fetch(path, { method, headers, body, signal });
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const message = data && typeof data.message === "string" ? data.message : `${res.status} ${res.statusText}`;
    if (res.status === 401) showKeyError(message);
    throw new ApiError(res.status, message);
  }
  clearError($("#api-key-error"));
  return data;
}

function showKeyError(message) {
  showError($("#api-key-error"), message);
  $("#api-key").setAttribute("aria-invalid", "true");
  $("#api-key").focus();
}

// The API's messages in words for the page. DirectAI's validation message (pydantic's whole report on one line) becomes
// one short line per problem, naming the class by its number; the API's own message stays below it as the detail.
const FIELDS = {
  name: "its name",
  examples_to_include: "its examples",
  examples_to_exclude: "its excluded examples",
  detection_threshold: "its detection threshold",
  nms_threshold: "the overlap (NMS) threshold",
  open_set: "the open-set option",
};

function explain(message) {
  if (!/^\d+ validation errors? for Request/.test(message)) return { text: message, detail: "" };
  const problems = message.split(" body -> ").slice(1).map((part) => {
    const loc = part.split(" -> ");
    const last = loc.pop();
    const field = last.split(" ")[0];
    const msg = last.slice(field.length + 1).replace(/ \(type=[^)]*\)\s*$/, "");
    let what = FIELDS[field] || field;
    if (/_configs$/.test(loc[0] || "") && /^\d+$/.test(loc[1] || "")) what = `Class ${Number(loc[1]) + 1}: ${what}`;
    return `${what} ${/at least 1 character/.test(msg) ? "cannot be empty" : msg}`;
  });
  const text = problems.length ? `Not deployable yet. ${problems.join("; ")}.` : "The server did not accept these settings.";
  return { text, detail: message };
}

function showError(el, message) {
  const { text, detail } = explain(message);
  el.textContent = text;
  if (detail) {
    const small = document.createElement("small");
    small.className = "detail";
    small.textContent = `Server: ${detail}`;
    el.append(small);
  }
  el.hidden = false;
}

function clearError(el) {
  el.textContent = "";
  el.hidden = true;
  if (el.id === "api-key-error") $("#api-key").removeAttribute("aria-invalid");
}

let inFlight = 0;
function busy(delta) {
  inFlight += delta;
  $("#spinner").hidden = inFlight === 0;
  document.body.setAttribute("aria-busy", inFlight > 0 ? "true" : "false");
}

async function tracked(promise) {
  busy(1);
  try {
    return await promise;
  } finally {
    busy(-1);
  }
}

// -- The configuration form ---------------------------------------------------------------------------------------
function kind() {
  return $('input[name="kind"]:checked').value;
}

function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter(Boolean);
}

// Image examples of a class: {"image": data URI} (files added here) or {"url": ...} (from an imported config), kept on
// the class's node in order; texts stay in the textareas.
function addImageExample(node, entry, positive) {
  node.imageExamples = node.imageExamples || [];
  const item = { entry, positive };
  node.imageExamples.push(item);
  const li = document.createElement("li");
  li.className = positive ? "positive" : "negative";
  const src = entry.image ? (entry.image.startsWith("data:") ? entry.image : `data:image/*;base64,${entry.image}`) : entry.url;
  const n = node.imageExamples.length;
  li.innerHTML = `<img alt=""><span class="sign"></span><button type="button">Remove</button>`;
  $("img", li).src = src;
  $("img", li).alt = `${positive ? "Included" : "Excluded"} image example ${n}`;
  $(".sign", li).textContent = positive ? "+" : "−";
  $("button", li).setAttribute("aria-label", `Remove ${positive ? "included" : "excluded"} image example ${n}`);
  $("button", li).addEventListener("click", () => {
    node.imageExamples = node.imageExamples.filter((x) => x !== item);
    li.remove();
    changed();
  });
  $(".thumbs", node).append(li);
}

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addImageFiles(node, files, positive) {
  for (const f of files) addImageExample(node, { image: await readDataUri(f) }, positive);
  changed();
}

function imageEntries(node, positive) {
  return (node.imageExamples || []).filter((x) => x.positive === positive).map((x) => x.entry);
}

function addClass(c = {}) {
  const node = $("#class-template").content.firstElementChild.cloneNode(true);
  $(".name", node).value = c.name || "";
  const isText = (e) => typeof e === "string";
  $(".include", node).value = (c.examples_to_include || []).filter(isText).join("\n");
  $(".exclude", node).value = (c.examples_to_exclude || []).filter(isText).join("\n");
  for (const e of (c.examples_to_include || []).filter((x) => !isText(x))) addImageExample(node, e, true);
  for (const e of (c.examples_to_exclude || []).filter((x) => !isText(x))) addImageExample(node, e, false);
  $(".include-images", node).addEventListener("change", (e) => {
    addImageFiles(node, Array.from(e.target.files), true);
    e.target.value = "";
  });
  $(".exclude-images", node).addEventListener("change", (e) => {
    addImageFiles(node, Array.from(e.target.files), false);
    e.target.value = "";
  });
  const t = c.detection_threshold ?? 0.1;
  $(".threshold", node).value = String(t);
  $(".threshold-value", node).textContent = Number(t).toFixed(2);
  $(".remove", node).addEventListener("click", () => {
    node.remove();
    renumber();
    changed();
  });
  $(".threshold", node).addEventListener("input", (e) => {
    $(".threshold-value", node).textContent = Number(e.target.value).toFixed(2);
  });
  $("#classes").append(node);
  renumber();
  return node;
}

function renumber() {
  $$("#classes .class").forEach((node, i) => {
    $(".n", node).textContent = String(i + 1);
    $(".remove", node).setAttribute("aria-label", `Remove class ${i + 1}`);
    node.style.borderLeftColor = COLOURS[i % COLOURS.length];
  });
}

function currentConfig() {
  const k = kind();
  const classes = $$("#classes .class").map((node) => {
    const c = {
      name: $(".name", node).value.trim(),
      examples_to_include: [...lines($(".include", node).value), ...imageEntries(node, true)],
      examples_to_exclude: [...lines($(".exclude", node).value), ...imageEntries(node, false)],
    };
    if (k === "detector") c.detection_threshold = Number($(".threshold", node).value);
    return c;
  });
  if (k === "detector") {
    return {
      detector_configs: classes,
      nms_threshold: Number($("#nms").value),
      class_agnostic_nms: $("#agnostic").checked,
      augment_examples: $("#augment").checked,
    };
  }
  const cfg = { classifier_configs: classes, augment_examples: $("#augment").checked };
  if ($("#open-set").checked) {
    cfg.open_set = { label: $("#open-label").value.trim() || "none of these", threshold: Number($("#open-threshold").value) };
  }
  return cfg;
}

function loadConfig(cfg) {
  const isDetector = Array.isArray(cfg.detector_configs);
  const classes = isDetector ? cfg.detector_configs : cfg.classifier_configs;
  if (!Array.isArray(classes)) throw new Error("Not a classifier or detector configuration (no classifier_configs or detector_configs).");
  $(`input[name="kind"][value="${isDetector ? "detector" : "classifier"}"]`).checked = true;
  $("#classes").replaceChildren();
  classes.forEach((c) => addClass(c));
  $("#augment").checked = cfg.augment_examples ?? true;
  $("#open-set").checked = Boolean(cfg.open_set);
  if (cfg.open_set) {
    $("#open-label").value = cfg.open_set.label ?? "none of these";
    $("#open-threshold").value = String(cfg.open_set.threshold);
    $("#open-threshold-value").textContent = Number(cfg.open_set.threshold).toFixed(2);
  }
  if (isDetector) {
    $("#nms").value = String(cfg.nms_threshold ?? 0.4);
    $("#agnostic").checked = cfg.class_agnostic_nms ?? true;
  }
  syncKind();
  changed();
}

function syncKind() {
  document.body.dataset.kind = kind();
  $("#nms-value").textContent = Number($("#nms").value).toFixed(2);
  state.lastDeployed = null;
  for (const img of state.images) renderResult(img);
}

// -- Images ---------------------------------------------------------------------------------------------------------
function addImage(source) {
  const img = { id: state.nextImage++, result: null, error: null, ...source };
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.image = String(img.id);
  li.innerHTML = `<figure><div class="frame"><img alt=""><div class="boxes"></div></div>
    <figcaption></figcaption></figure><p class="error" role="alert" hidden></p>
    <ol class="bars" aria-label="Class scores"></ol><button type="button" class="remove-image"></button>`;
  $("img", li).src = img.src;
  $("img", li).alt = img.name;
  $("figcaption", li).textContent = img.name;
  $(".remove-image", li).textContent = "Remove";
  $(".remove-image", li).setAttribute("aria-label", `Remove image ${img.name}`);
  $(".remove-image", li).addEventListener("click", () => {
    state.images = state.images.filter((x) => x !== img);
    if (img.blob) URL.revokeObjectURL(img.src);
    li.remove();
  });
  img.el = li;
  state.images.push(img);
  $("#strip").append(li);
  changed();
}

function addFiles(files) {
  for (const f of files) {
    addImage({ name: f.name || "pasted image", src: URL.createObjectURL(f), blob: f });
  }
}

// -- Results ------------------------------------------------------------------------------------------------------
function renderResult(img) {
  const li = img.el;
  const err = $(".error", li);
  if (img.error) showError(err, img.error);
  else clearError(err);
  const bars = $(".bars", li);
  const boxes = $(".boxes", li);
  bars.replaceChildren();
  boxes.replaceChildren();
  li.dataset.kind = "";
  const r = img.result;
  if (!r || img.error) return;
  li.dataset.kind = r.kind;
  if (r.kind === "classifier") {
    const names = Object.keys(r.data.scores).sort((a, b) => r.data.scores[b] - r.data.scores[a]);
    const order = Object.keys(r.data.scores);
    for (const name of names) {
      const score = r.data.scores[name];
      const raw = r.data.raw_scores[name];
      const row = document.createElement("li");
      row.className = name === r.data.pred ? "bar pred" : "bar";
      row.dataset.class = name;
      row.dataset.score = String(score);
      row.dataset.raw = String(raw);
      row.title = `raw score ${raw.toFixed(4)}`;
      row.style.setProperty("--w", `${(score * 100).toFixed(2)}%`);
      row.style.setProperty("--c", COLOURS[order.indexOf(name) % COLOURS.length]);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = name === r.data.pred ? `${name} (prediction)` : name;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = score.toFixed(3);
      row.append(label, value);
      bars.append(row);
    }
    if (r.data.rejected) {
      // Open set: the best class's evidence is below the threshold; the bars stay the deployment's scores.
      const note = document.createElement("li");
      note.className = "rejected-note";
      note.dataset.rejected = r.data.pred;
      note.textContent = `${r.data.pred} (rejected: best raw score below the open-set threshold)`;
      bars.prepend(note);
    }
  } else {
    const node = $("img", li);
    const w = node.naturalWidth || 1;
    const h = node.naturalHeight || 1;
    const order = r.classes;
    for (const d of r.data) {
      const [x1, y1, x2, y2] = d.tlbr;
      const box = document.createElement("div");
      box.className = "box";
      box.dataset.class = d.class;
      box.dataset.score = String(d.score);
      box.dataset.tlbr = d.tlbr.join(",");
      box.style.left = `${(100 * x1) / w}%`;
      box.style.top = `${(100 * y1) / h}%`;
      box.style.width = `${(100 * (x2 - x1)) / w}%`;
      box.style.height = `${(100 * (y2 - y1)) / h}%`;
      box.style.setProperty("--c", COLOURS[Math.max(0, order.indexOf(d.class)) % COLOURS.length]);
      const tag = document.createElement("span");
      tag.textContent = `${d.class} ${d.score.toFixed(2)}`;
      box.append(tag);
      boxes.append(box);
    }
    $(".bars", li).setAttribute("aria-label", `${r.data.length} boxes`);
    filterBoxes();
  }
}

function filterBoxes() {
  const min = Number($("#min-score").value);
  $("#min-score-value").textContent = min.toFixed(2);
  for (const box of $$(".box")) box.hidden = Number(box.dataset.score) < min;
}

// -- The live loop: debounced, the previous run cancelled -----------------------------------------------------------
function changed() {
  document.body.dataset.state = "pending";
  clearTimeout(state.timer);
  state.timer = setTimeout(run, DEBOUNCE_MS);
}

async function whenImageLoaded(img) {
  const node = $("img", img.el);
  if (node.complete) return;
  await new Promise((resolve) => {
    node.addEventListener("load", resolve, { once: true });
    node.addEventListener("error", resolve, { once: true });
  });
}

async function run() {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const { signal } = controller;
  const k = kind();
  const cfg = currentConfig();
  const classes = cfg.detector_configs || cfg.classifier_configs;
  // Still being written (a class without a name or without examples): nothing to deploy yet, and nothing wrong.
  const unfinished = classes.some((c) => !c.name || c.examples_to_include.length + c.examples_to_exclude.length === 0);
  $("#config-hint").hidden = !unfinished;
  if (unfinished) {
    clearError($("#config-error"));
    document.body.dataset.state = "incomplete";
    return;
  }
  document.body.dataset.state = "busy";
  clearError($("#run-error"));
  busy(1);
  try {
    const draftKey = DRAFT_STORE + k;
    const key = JSON.stringify(cfg);
    let draft = localStorage.getItem(draftKey);
    if (state.lastDeployed !== key || !draft) {
      try {
        const out = await api(`/deploy_${k}`, { method: "POST", json: { ...cfg, deployed_id: draft || undefined }, signal });
        draft = out.deployed_id;
        localStorage.setItem(draftKey, draft);
        state.lastDeployed = key;
        clearError($("#config-error"));
        document.body.dataset.draft = draft;
      } catch (e) {
        if (signal.aborted) return;
        state.lastDeployed = null;
        showError($("#config-error"), e.message);
        for (const img of state.images) {
          img.result = null;
          img.error = null;
          renderResult(img);
        }
        document.body.dataset.state = "error";
        return;
      }
    }
    const names = classes.map((c) => c.name);
    await Promise.all(
      state.images.map(async (img) => {
        const form = new FormData();
        form.append("data", img.blob || img.url);
        const route = k === "detector" ? "detect" : "classify";
        try {
          const data = await api(`/${route}?deployed_id=${encodeURIComponent(draft)}`, { method: "POST", form, signal });
          if (k === "detector") await whenImageLoaded(img);
          img.result = { kind: k, classes: names, data: k === "detector" ? data[0] : data };
          img.error = null;
        } catch (e) {
          if (signal.aborted) return;
          img.result = null;
          img.error = e.message;
        }
        renderResult(img);
      }),
    );
    if (signal.aborted) return;
    document.body.dataset.state = state.images.some((i) => i.error) ? "error" : "done";
  } catch (e) {
    if (signal.aborted) return;
    showError($("#run-error"), e.message);
    document.body.dataset.state = "error";
  } finally {
    busy(-1);
  }
}

// -- Import, export, deploy, deployments ------------------------------------------------------------------------
function curlFor(id) {
  const origin = window.location.origin;
  const route = kind() === "detector" ? "detect" : "classify";
  const key = $("#api-key").value.trim() ? " -H 'Authorization: Bearer $ZSS_API_KEY'" : "";
  return `curl -s "${origin}/${route}?deployed_id=${id}"${key} -F data=@photo.jpg`;
}

function showDeployed(id, message) {
  $("#deployed-id").value = id;
  $("#deploy-message").textContent = message;
  $("#deploy-message").dataset.id = id;
  $("#curl").value = curlFor(id);
  $("#deployed").hidden = false;
}

async function deploy() {
  clearError($("#deploy-error"));
  const id = $("#deployed-id").value.trim();
  const body = { ...currentConfig() };
  if (id) body.deployed_id = id;
  try {
    const out = await tracked(api(`/deploy_${kind()}`, { method: "POST", json: body }));
    showDeployed(out.deployed_id, out.message);
    refreshList();
  } catch (e) {
    showError($("#deploy-error"), e.message);
  }
}

async function importById() {
  clearError($("#deploy-error"));
  const id = $("#deployed-id").value.trim();
  if (!id) {
    showError($("#deploy-error"), "Enter a deployed id to import.");
    $("#deployed-id").focus();
    return;
  }
  try {
    const cfg = await tracked(api(`/model_config?deployed_id=${encodeURIComponent(id)}`));
    delete cfg.deployed_id;
    loadConfig(cfg);
    showDeployed(id, `Imported ${id}.`);
  } catch (e) {
    showError($("#deploy-error"), e.message);
  }
}

async function importFile(file) {
  clearError($("#deploy-error"));
  try {
    const cfg = JSON.parse(await file.text());
    const id = cfg.deployed_id;
    delete cfg.deployed_id;
    loadConfig(cfg);
    $("#deployed-id").value = id || "";
    $("#deploy-message").textContent = `Imported ${file.name}.`;
  } catch (e) {
    showError($("#deploy-error"), `Cannot import ${file.name}: ${e.message}`);
  }
}

function exportJson() {
  const cfg = currentConfig();
  const blob = new Blob([JSON.stringify(cfg, null, 2) + "\n"], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${kind()}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    $("#deploy-message").textContent = `${what} copied.`;
  } catch {
    $("#curl").select();
    $("#deploy-message").textContent = `Select and copy the ${what.toLowerCase()} by hand.`;
  }
}

async function refreshList() {
  clearError($("#list-error"));
  try {
    const { deployments } = await tracked(api("/deployments"));
    const rows = deployments
      .sort((a, b) => b.updated_at - a.updated_at)
      .map((d) => {
        const tr = document.createElement("tr");
        tr.dataset.id = d.deployed_id;
        const draft = localStorage.getItem(DRAFT_STORE + d.kind) === d.deployed_id;
        if (draft) tr.dataset.draft = "true";
        const idText = draft ? `${d.deployed_id} (this page's draft)` : d.deployed_id;
        const cells = [idText, d.kind, String(d.n_classes), new Date(d.updated_at * 1000).toLocaleString()];
        for (const text of cells) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.append(td);
        }
        const td = document.createElement("td");
        const load = document.createElement("button");
        load.type = "button";
        load.textContent = "Load";
        load.className = "load";
        load.setAttribute("aria-label", `Load ${d.deployed_id}`);
        load.addEventListener("click", () => {
          $("#deployed-id").value = d.deployed_id;
          importById();
        });
        const del = document.createElement("button");
        del.type = "button";
        del.textContent = "Delete";
        del.className = "delete";
        del.setAttribute("aria-label", `Delete ${d.deployed_id}`);
        del.addEventListener("click", () => deleteDeployment(d.deployed_id));
        td.append(load, del);
        tr.append(td);
        return tr;
      });
    $("#deployment-rows").replaceChildren(...rows);
  } catch (e) {
    showError($("#list-error"), e.message);
  }
}

async function deleteDeployment(id) {
  if (!window.confirm(`Delete deployment ${id}?`)) return;
  try {
    await tracked(api(`/deployments/${encodeURIComponent(id)}`, { method: "DELETE" }));
    for (const k of ["classifier", "detector"]) {
      if (localStorage.getItem(DRAFT_STORE + k) === id) localStorage.removeItem(DRAFT_STORE + k);
    }
    await refreshList();
  } catch (e) {
    showError($("#list-error"), e.message);
  }
}

// -- Collections: search a collection, classify it with the current classifier -----------------------------------
// Thumbnails are fetched with the API key (an <img src> could not send it) and shown as blob: URLs, freed on redraw.
const thumbUrls = { matches: [], "class-items": [] };

function collectionName() {
  return $("#collection").value;
}

async function refreshCollections() {
  clearError($("#collections-error"));
  try {
    const data = await tracked(api("/collections"));
    const select = $("#collection");
    const keep = select.value;
    const options = data.collections.map((c) => {
      const o = document.createElement("option");
      o.value = c.name;
      o.textContent = `${c.name} (${c.count})`;
      return o;
    });
    const none = document.createElement("option");
    none.value = "";
    none.textContent = options.length ? "(pick a collection)" : "(no collection)";
    select.replaceChildren(none, ...options);
    if (data.collections.some((c) => c.name === keep)) select.value = keep;
    else if (options.length === 1) select.value = options[0].value;
    showCollection(data.collections.find((c) => c.name === select.value));
  } catch (e) {
    showError($("#collections-error"), e.message);
  }
}

function showCollection(info) {
  $("#collection-info").textContent = info ? `${info.count} images, model ${info.model_id}` : "";
  renderMatches("matches", []);
  $("#class-tabs").replaceChildren();
  renderMatches("class-items", []);
}

async function thumbnail(name, id) {
  const headers = {};
  const key = $("#api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(`/collections/${encodeURIComponent(name)}/thumbnails/${encodeURIComponent(id)}`, { headers });
  if (!res.ok) return null; // an item imported as a vector has no thumbnail
  return URL.createObjectURL(await res.blob());
}

// Items as thumbnail cards: [{id, score (shown), title (on hover)}], in the order given.
function renderMatches(listId, items, name = collectionName()) {
  for (const u of thumbUrls[listId]) URL.revokeObjectURL(u);
  thumbUrls[listId] = [];
  const cards = items.map((it) => {
    const li = document.createElement("li");
    li.className = "match";
    li.dataset.id = it.id;
    li.dataset.score = String(it.score);
    li.title = it.title;
    const img = document.createElement("img");
    img.alt = it.id;
    const caption = document.createElement("span");
    caption.className = "id";
    caption.textContent = it.id;
    const score = document.createElement("span");
    score.textContent = it.score.toFixed(3);
    li.append(img, caption, score);
    thumbnail(name, it.id).then((url) => {
      if (!url) return;
      thumbUrls[listId].push(url);
      img.src = url;
    });
    return li;
  });
  $(`#${listId}`).replaceChildren(...cards);
}

async function searchCollection(query) {
  const name = collectionName();
  clearError($("#collections-error"));
  if (!name) {
    showError($("#collections-error"), "Pick a collection first.");
    return;
  }
  const k = Math.max(1, Math.min(100, Number($("#search-k").value) || 12));
  try {
    const data = await tracked(
      api(`/collections/${encodeURIComponent(name)}/search`, { method: "POST", json: { ...query, k } }),
    );
    renderMatches(
      "matches",
      data.results.map((h) => ({ id: h.id, score: h.score, title: `score ${h.score}\n${JSON.stringify(h.metadata)}` })),
    );
    document.body.dataset.search = "done";
  } catch (e) {
    showError($("#collections-error"), e.message);
  }
}

async function searchByImage(file) {
  if (file) await searchCollection({ image: await readDataUri(file) });
}

async function classifyCollection() {
  const name = collectionName();
  clearError($("#collections-error"));
  if (!name) return showError($("#collections-error"), "Pick a collection first.");
  if (kind() !== "classifier") return showError($("#collections-error"), "Switch the model to Classifier first.");
  if (state.lastDeployed !== JSON.stringify(currentConfig())) await run(); // the draft holds what the form shows
  const draft = localStorage.getItem(DRAFT_STORE + "classifier");
  if (!draft || state.lastDeployed !== JSON.stringify(currentConfig())) {
    return showError($("#collections-error"), "Build a classifier above first (a name and an example per class).");
  }
  try {
    const body = { deployed_id: draft, limit: 0, top: 24 };
    const out = await tracked(api(`/collections/${encodeURIComponent(name)}/classify`, { method: "POST", json: body }));
    const tabs = Object.entries(out.counts).map(([cls, n]) => {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.class = cls;
      b.dataset.count = String(n);
      b.textContent = `${cls} (${n})`;
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => showClass(out, cls, name));
      return b;
    });
    $("#class-tabs").replaceChildren(...tabs);
    const first = Object.keys(out.counts).find((c) => out.counts[c] > 0);
    if (first !== undefined) showClass(out, first, name);
    else renderMatches("class-items", []);
    document.body.dataset.classified = draft;
  } catch (e) {
    showError($("#collections-error"), e.message);
  }
}

function showClass(out, cls, name) {
  for (const b of $$("#class-tabs button")) b.setAttribute("aria-pressed", String(b.dataset.class === cls));
  const rows = (out.top && out.top[cls]) || []; // an open set's label has no top list: its items scored no class
  renderMatches(
    "class-items",
    rows.map((r) => ({ id: r.id, score: r.raw_score, title: `raw score ${r.raw_score} (their order), probability ${r.score}` })),
    name,
  );
}

// -- Wiring -------------------------------------------------------------------------------------------------------
function wire() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) sessionStorage.setItem(KEY_STORE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORE);
    clearError($("#api-key-error"));
    state.lastDeployed = null;
    changed();
  });

  $("#config").addEventListener("input", (e) => {
    if (e.target.closest(".deploy")) return;
    if (e.target.id === "nms") $("#nms-value").textContent = Number(e.target.value).toFixed(2);
    if (e.target.id === "open-threshold") $("#open-threshold-value").textContent = Number(e.target.value).toFixed(2);
    changed();
  });
  for (const r of $$('input[name="kind"]')) {
    r.addEventListener("change", () => {
      syncKind();
      changed();
    });
  }
  $("#add-class").addEventListener("click", () => {
    $(".name", addClass()).focus();
    changed();
  });

  $("#file").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(Array.from(e.dataTransfer.files).filter((f) => f.type.startsWith("image/")));
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData?.files || []).filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $("#url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("#url").value.trim();
    if (!url) return;
    addImage({ name: url, src: url, url });
    $("#url").value = "";
  });
  $("#min-score").addEventListener("input", filterBoxes);

  $("#import-file").addEventListener("change", (e) => {
    if (e.target.files[0]) importFile(e.target.files[0]);
    e.target.value = "";
  });
  $("#import-id").addEventListener("click", importById);
  $("#deploy").addEventListener("click", deploy);
  $("#export").addEventListener("click", exportJson);
  $("#copy-id").addEventListener("click", () => copy($("#deployed-id").value, "Id"));
  $("#copy-curl").addEventListener("click", () => copy($("#curl").value, "Curl command"));
  $("#refresh").addEventListener("click", refreshList);

  $("#collections-refresh").addEventListener("click", refreshCollections);
  $("#collection").addEventListener("change", () => {
    showCollection(null);
    refreshCollections();
  });
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#search-text").value.trim();
    if (text) searchCollection({ text });
  });
  $("#search-file").addEventListener("change", (e) => {
    searchByImage(e.target.files[0]);
    e.target.value = "";
  });
  const searchDrop = $("#search-drop");
  searchDrop.addEventListener("dragover", (e) => {
    e.preventDefault();
    searchDrop.classList.add("over");
  });
  searchDrop.addEventListener("dragleave", () => searchDrop.classList.remove("over"));
  searchDrop.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    searchDrop.classList.remove("over");
    searchByImage(Array.from(e.dataTransfer.files).find((f) => f.type.startsWith("image/")));
  });
  $("#classify-collection").addEventListener("click", classifyCollection);
}

async function start() {
  wire();
  try {
    state.settings = await api("/ui/settings.json");
  } catch {
    // An older server: keep the defaults (no URL field).
  }
  $("#url-form").hidden = !state.settings.allow_url_fetch;
  $("#kind-detector").disabled = !state.settings.detector_enabled;
  addClass({ name: "", examples_to_include: [] });
  syncKind();
  document.body.dataset.state = "idle";
  refreshList();
  refreshCollections();
}

window.zss = { currentConfig, loadConfig, explain };
start();
