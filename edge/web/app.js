// conveyor-vision live page: polls /api/status and refreshes the camera images.
"use strict";

// The token travels in the URL's fragment (#token=…), which the browser never sends to the
// server, and goes out only in the Authorization header: never in a URL a log could keep.
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const authorized = token ? {headers: {Authorization: "Bearer " + token}} : {};
async function getBlobUrl(url) {
  const res = await fetch(url, {cache: "no-store", ...authorized});
  if (!res.ok) throw new Error("HTTP " + res.status);
  return URL.createObjectURL(await res.blob());
}
const CAMERA_REFRESH_MS = 250;
const STATUS_REFRESH_MS = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function rows(table, entries) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...entries.map(cells => el("tr", {}, ...cells.map(c => c instanceof Node ? el("td", {}, c) : el("td", {}, c)))));
}

const cameraImages = new Map();

function ensureCamera(id) {
  if (cameraImages.has(id)) return;
  const img = el("img", {"data-camera": id, alt: "camera " + id});
  const caption = el("figcaption", {}, id);
  document.getElementById("cameras").append(el("div", {class: "camera"}, el("figure", {}, img, caption)));
  cameraImages.set(id, {img, caption, loading: false, updates: 0});
}

function refreshCameras() {
  for (const [id, cam] of cameraImages) {
    if (cam.loading) continue;
    cam.loading = true;
    getBlobUrl("/api/camera/" + encodeURIComponent(id) + ".jpg?t=" + Date.now()).then(src => {
      const old = cam.img.src;
      cam.img.src = src;
      if (old.startsWith("blob:")) URL.revokeObjectURL(old);
      cam.updates += 1;
      cam.img.dataset.updates = String(cam.updates);
      cam.loading = false;
    }, () => { cam.loading = false; });
  }
}

function fmt(v, digits) { return (v === null || v === undefined) ? "–" : Number(v).toFixed(digits); }

function renderSidelined(items) {
  const box = document.getElementById("sidelined");
  if (!items.length) { box.replaceChildren(el("p", {class: "empty"}, "none yet")); return; }
  const known = new Set([...box.querySelectorAll(".snapshot")].map(n => n.dataset.snapshotId));
  const wanted = items.map(i => i.snapshot_id);
  if (wanted.length === known.size && wanted.every(id => known.has(id))) return;
  for (const old of box.querySelectorAll("img")) if (old.src.startsWith("blob:")) URL.revokeObjectURL(old.src);
  box.replaceChildren(...items.map(it => {
    const label = it.label ? " · feedback: " + it.label.kind : "";
    const findings = (it.findings || []).map(f => f.type + " " + fmt(f.probability, 2)).join(", ");
    const img = el("img", {alt: "snapshot of " + it.item_id});
    const link = el("a", {target: "_blank"}, img);
    getBlobUrl(it.sheet).then(src => { img.src = src; link.href = src; }, () => {});
    return el("div", {class: "snapshot", "data-snapshot-id": it.snapshot_id, "data-item-id": it.item_id},
      link,
      el("div", {class: "meta"},
        el("b", {}, it.item_id), " ", it.product_id || "?", " · ", it.reasons.join(", "),
        " · fused ", fmt(it.fused, 3), findings ? " · " + findings : "", label,
        " · ", new Date(it.decided_ms).toLocaleTimeString()));
  }));
}

function render(s) {
  document.getElementById("node-id").textContent = s.node.node_id + " / " + s.node.line_id + " · v" + s.node.version;
  const broker = document.getElementById("broker");
  broker.textContent = "broker " + (s.health.broker_connected ? "up" : "down");
  broker.className = "pill " + (s.health.broker_connected ? "up" : "down");
  document.getElementById("summary").textContent = s.summary;
  for (const cam of s.cameras) ensureCamera(cam.id);
  for (const cam of s.cameras) {
    const c = cameraImages.get(cam.id);
    c.caption.textContent = cam.id + " · " + fmt(cam.fps, 1) + " fps · dropped " + cam.dropped;
  }
  rows("#stages", Object.entries(s.stage_ms).map(([k, v]) => [k, fmt(v, 2)]));
  rows("#queues", Object.entries(s.queues).map(([k, v]) => [k, v]));
  rows("#calibration", Object.entries(s.calibration).map(([cam, c]) => [
    cam,
    c.ok === null ? el("span", {class: "empty"}, "not checked yet")
                  : el("span", {class: c.ok ? "ok" : "bad"}, c.ok ? "check ok" : "check failed"),
    c.source + (c.calibrated ? ", calibrated " + (c.calibrated_at || "") : ", not calibrated"),
    c.check ? "drift " + fmt(c.check.drift_mm, 1) + " mm, tilt " + fmt(c.check.tilt_deg, 2) + "°"
              + (c.check.reasons && c.check.reasons.length ? " (" + c.check.reasons.join("; ") + ")" : "")
            : ""]));
  rows("#recent", s.recent.map(r => [
    r.item_id, el("span", {class: r.decision}, r.decision), r.reasons.join(","), fmt(r.fused, 3)]));
  const snap = s.snapshots;
  document.getElementById("snapshots").textContent = snap ?
    snap.stored + " stored, " + (snap.bytes / 1048576).toFixed(1) + " of " + (snap.max_bytes / 1048576).toFixed(0) + " MB, " + snap.saved + " saved, " + snap.lost + " lost" :
    "off";
  renderSidelined(s.sidelined);
}

async function poll() {
  try {
    const res = await fetch("/api/status", {cache: "no-store", ...authorized});
    if (res.ok) render(await res.json());
    else document.getElementById("summary").textContent = "status: HTTP " + res.status;
  } catch (e) {
    document.getElementById("summary").textContent = "node unreachable";
  }
}

poll();
setInterval(poll, STATUS_REFRESH_MS);
setInterval(refreshCameras, CAMERA_REFRESH_MS);
