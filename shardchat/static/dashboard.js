// The operator dashboard of the admin port: charts of the supervisor's samples (/series),
// the shards (/status), and rooms, presence, history and actions through the server API
// (the admin port's /api/<method>, which adds the API key: the browser never holds it).
// The admin token, when the server has one, lives in this tab's sessionStorage only.
// Everything from the server is inserted as text, never as HTML.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "shardchat-admin-token";
const WINDOW_MS = 5 * 60 * 1000;  // the samples kept: the supervisor keeps five minutes
const MIN_SPAN_MS = 30 * 1000;    // the charts' narrowest time axis (a server just started)
const COLORS = ["#3563d8", "#d8592f", "#2c9c5a", "#9b45c4", "#c49a19", "#1a9aa8", "#c4456f", "#6b6b6b"];

let samples = [];
let lastT = 0;
let selectedRoom = null;
let apiOff = false;

// Requests

class Unauthorized extends Error {}

async function request(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { ...(options.headers ?? {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const answer = await fetch(path, { ...options, headers, cache: "no-store" });
  if (answer.status === 401) throw new Unauthorized("the admin token is required or wrong");
  return answer;
}

/** A server API call: its result, or an Error carrying the API's code and message. */
async function api(method, body) {
  const answer = await request(`/api/${method}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await answer.json().catch(() => ({}));
  if (answer.status !== 200 || data.error) {
    const error = new Error(data.error?.message ?? `HTTP ${answer.status}`);
    error.code = data.error?.code ?? String(answer.status);
    throw error;
  }
  return data.result;
}

// Login

function showLogin(message) {
  $("login").hidden = false;
  $("login-error").textContent = message;
  setState("login", "log in with the admin token");
}

$("login").onsubmit = async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  try {
    await request("/status").then((a) => a.json());
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("token").value = "";
    lastT = 0;
    samples = [];
    tick();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error instanceof Unauthorized ? "refused: wrong admin token" : String(error.message));
  }
};

function setState(state, text) {
  $("state").dataset.state = state;
  $("state").textContent = text;
}

// Charts: plain canvas, one line per series, the last five minutes.

function drawChart(id, series, unit = "") {
  const canvas = $(id);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  // The time axis: what is held, at least MIN_SPAN_MS, at most the five minutes.
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, samples.length ? now - samples[0].t : 0));
  let max = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
  max = niceCeiling(max);
  const left = 44, bottom = 16, top = 6, right = 6;
  const plotW = Math.max(10, width - left - right), plotH = Math.max(10, height - top - bottom);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667";
  ctx.strokeStyle = "#e4e4ee";
  ctx.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + plotW, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(formatNumber(max * f) + unit, left - 4, y);
  }
  ctx.textAlign = "left"; ctx.textBaseline = "bottom";
  ctx.fillText(span >= 120000 ? `-${Math.round(span / 60000)} min` : `-${Math.round(span / 1000)} s`, left, height);
  ctx.textAlign = "right";
  ctx.fillText("now", left + plotW, height);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    let drawing = false;
    for (const [t, v] of s.points) {
      if (v === null || now - t > span) { drawing = false; continue; }
      const x = left + plotW * (1 - (now - t) / span);
      const y = top + plotH * (1 - (max ? v / max : 0));
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    }
    ctx.stroke();
  }
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  canvas.dataset.max = String(max);
}

function niceCeiling(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function formatNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v >= 1e7 ? 0 : 1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v >= 1e4 ? 0 : 1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
}

function legend(id, names, offset = 0) {
  const box = $(id);
  box.replaceChildren();
  names.forEach((name, i) => {
    const span = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[(i + offset) % COLORS.length];
    span.append(swatch, document.createTextNode(name));
    box.appendChild(span);
  });
}

function drawCharts() {
  const points = (f) => samples.map((s) => [s.t, f(s)]);
  const shardCount = samples.length ? samples[samples.length - 1].shards.length : 0;
  const perShard = (key) => Array.from({ length: shardCount }, (_, i) => ({
    color: COLORS[(i + 1) % COLORS.length], points: points((s) => s.shards[i]?.[key] ?? null),
  }));
  drawChart("chart-connections", [{ color: COLORS[0], points: points((s) => s.connections) }, ...perShard("connections")]);
  legend("legend-connections", ["all", ...Array.from({ length: shardCount }, (_, i) => `shard ${i}`)]);
  drawChart("chart-messages", [{ color: COLORS[0], points: points((s) => s.messages_in) }]);
  drawChart("chart-deliveries", [{ color: COLORS[2], points: points((s) => s.deliveries) }]);
  drawChart("chart-latency", [{ color: COLORS[0], points: points((s) => s.p50_ms) },
                              { color: COLORS[1], points: points((s) => s.p99_ms) }]);
  legend("legend-latency", ["p50", "p99"]);
  drawChart("chart-lag", Array.from({ length: shardCount }, (_, i) => ({
    color: COLORS[(i + 1) % COLORS.length], points: points((s) => s.shards[i]?.lag ?? null) })));
  legend("legend-lag", Array.from({ length: shardCount }, (_, i) => `shard ${i}`), 1);
  const last = samples[samples.length - 1];
  if (last) {
    $("now-connections").textContent = formatNumber(last.connections);
    $("now-messages").textContent = formatNumber(last.messages_in);
    $("now-deliveries").textContent = formatNumber(last.deliveries);
    $("now-latency").textContent = last.p50_ms === null ? "–" : `${formatNumber(last.p50_ms)} / ${formatNumber(last.p99_ms)}`;
    $("now-lag").textContent = formatNumber(Math.max(0, ...last.shards.map((s) => s.lag)));
  }
}

// Tables

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function duration(seconds) {
  if (!seconds) return "–";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function renderStatus(status) {
  const body = $("shards").querySelector("tbody");
  body.replaceChildren();
  for (const s of status.shards) {
    const tr = document.createElement("tr");
    tr.dataset.shard = String(s.id);
    cell(tr, String(s.id));
    cell(tr, s.alive ? String(s.pid) : "down", s.alive ? "" : "dead");
    cell(tr, duration(s.uptime));
    cell(tr, String(s.restarts));
    cell(tr, String(s.connections));
    cell(tr, String(s.rooms));
    cell(tr, s.latency_ms ? `${s.latency_ms.toFixed(2)} ms` : "–");
    body.appendChild(tr);
  }
  const broker = status.broker;
  $("broker").textContent = `broker ${broker.kind}${broker.healthy ? "" : " (unhealthy)"} · epoch ${status.epoch} · up ${duration(status.uptime)}`;
  const redis = $("redis");
  redis.hidden = broker.kind !== "redis";
  if (broker.kind === "redis") {
    redis.textContent = `Redis ${broker.redis}: ${broker.shards_connected} shards connected, ${broker.subscribed_rooms} rooms subscribed, ${broker.errors} errors, ${broker.reconnects} reconnects`;
  }
}

function roomList(result) {
  // The API's rooms: {rooms: [{room, users, connections}], cursor}.
  return (result?.rooms ?? []).map((r) => ({ room: r.room, count: r.users, connections: r.connections }));
}

function renderRooms(rooms) {
  const body = $("rooms").querySelector("tbody");
  body.replaceChildren();
  rooms.sort((a, b) => (b.count ?? 0) - (a.count ?? 0) || a.room.localeCompare(b.room));
  for (const r of rooms) {
    const tr = document.createElement("tr");
    tr.dataset.room = r.room;
    if (r.room === selectedRoom) tr.className = "current";
    cell(tr, r.room);
    cell(tr, String(r.count));
    cell(tr, String(r.connections));
    tr.onclick = () => selectRoom(r.room);
    body.appendChild(tr);
  }
  $("room-count").textContent = String(rooms.length);
}

function presenceUsers(result) {
  // The API's presence: {users: [{user, connections}], count, connections}.
  return (result?.users ?? []).map((u) => u.user);
}

async function selectRoom(room) {
  selectedRoom = room;
  for (const tr of $("rooms").querySelectorAll("tbody tr")) {
    tr.className = tr.dataset.room === room ? "current" : "";
  }
  $("detail-name").textContent = "#" + room;
  $("publish-room").value = room;
  await refreshRoom();
}

async function refreshRoom() {
  const room = selectedRoom;
  if (room === null || apiOff) return;
  try {
    const [presence, history] = await Promise.all([
      api("presence", { room }), api("history", { room, limit: 20 }),
    ]);
    if (room !== selectedRoom) return;
    const users = presenceUsers(presence).sort();
    const list = $("presence");
    list.replaceChildren(...users.map((u) => { const li = document.createElement("li"); li.textContent = u; return li; }));
    $("presence-count").textContent = `(${users.length})`;
    const messages = history?.messages ?? [];
    const log = $("room-messages");
    log.replaceChildren(...messages.map((m) => {
      const li = document.createElement("li");
      li.dataset.seq = String(m.seq);
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = m.sender;
      const text = document.createElement("span");
      text.className = "content";
      text.textContent = m.content;
      li.append(who, text);
      return li;
    }));
  } catch (error) {
    if (error instanceof Unauthorized) showLogin("the admin token is required");
  }
}

// Actions

function actionResult(ok, text) {
  $("action-result").dataset.ok = String(ok);
  $("action-result").textContent = text;
}

$("publish").onsubmit = async (event) => {
  event.preventDefault();
  const room = $("publish-room").value.trim(), content = $("publish-content").value;
  try {
    const result = await api("publish", { room, content });
    actionResult(true, `published into ${room}: seq ${result?.seq ?? "?"}`);
    $("publish-content").value = "";
    if (room === selectedRoom) refreshRoom();
  } catch (error) {
    actionResult(false, `publish refused: ${error.code ? error.code + ": " : ""}${error.message}`);
  }
};

$("disconnect").onsubmit = async (event) => {
  event.preventDefault();
  const user = $("disconnect-user").value.trim();
  try {
    await api("disconnect", { user });
    actionResult(true, `disconnected ${user}`);
    $("disconnect-user").value = "";
  } catch (error) {
    actionResult(false, `disconnect refused: ${error.code ? error.code + ": " : ""}${error.message}`);
  }
};

// The loop: samples and shards every second, rooms every two.

let ticks = 0;
let timer = null;

async function tick() {
  clearTimeout(timer);
  try {
    const [fresh, status] = await Promise.all([
      request(`/series?after=${lastT}`).then((a) => a.json()),
      request("/status").then((a) => a.json()),
    ]);
    $("login").hidden = true;
    if (fresh.length) {
      samples.push(...fresh);
      lastT = fresh[fresh.length - 1].t;
      samples = samples.filter((s) => lastT - s.t <= WINDOW_MS);
    }
    drawCharts();
    renderStatus(status);
    setState("ok", `live · ${new Date().toLocaleTimeString()}`);
    if (ticks++ % 2 === 0) await refreshRooms();
  } catch (error) {
    if (error instanceof Unauthorized) {
      showLogin(sessionStorage.getItem(TOKEN_KEY) ? "refused: wrong admin token" : "");
      return; // until the login
    }
    setState("error", `cannot reach the admin port: ${error.message}`);
  }
  timer = setTimeout(tick, 1000);
}

function renderBoxes(info) {
  // The API's info: every shard of every box (with Redis, the boxes joined by it).
  const boxes = new Map();
  for (const s of info.shards) {
    const box = boxes.get(s.box) ?? { box: s.box, node: s.node, shards: 0, connections: 0, up: true };
    box.shards += 1;
    box.connections += s.connections;
    box.up = box.up && s.broker_up;
    boxes.set(s.box, box);
  }
  const body = $("boxes").querySelector("tbody");
  body.replaceChildren();
  for (const box of [...boxes.values()].sort((x, y) => x.box.localeCompare(y.box))) {
    const tr = document.createElement("tr");
    tr.dataset.box = box.box;
    cell(tr, box.box);
    cell(tr, String(box.shards));
    cell(tr, String(box.connections));
    cell(tr, box.up ? "up" : "down", box.up ? "" : "dead");
    body.appendChild(tr);
  }
  $("boxes-part").hidden = false;
  $("box-count").textContent = `${boxes.size} box${boxes.size === 1 ? "" : "es"} · ${info.broker}`;
}

async function refreshRooms() {
  try {
    const [rooms, info] = await Promise.all([api("rooms", {}), api("info", {})]);
    renderRooms(roomList(rooms));
    renderBoxes(info);
    apiOff = false;
    $("rooms-note").hidden = true;
    await refreshRoom();
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    apiOff = error.code === "api_off";
    $("rooms-note").hidden = false;
    $("rooms-note").textContent = apiOff
      ? `Rooms, presence, history and actions go through the server API: ${error.message}.`
      : `rooms: ${error.message}`;
  }
}

window.addEventListener("resize", drawCharts);
tick();
