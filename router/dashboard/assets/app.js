// wsrouter dashboard: the server-wide info stream (GET /info with the admin
// token) keeps the registrations and their members; /stats, every two
// seconds, gives message counters for the rates. No framework, no build.
"use strict";

const KEY = "wsrouter.admin";
const $ = (sel) => document.querySelector(sel);

const state = {
  regs: new Map(),  // id → {id, type, created, members: Map conn → member, rateIn, rateOut}
  selected: null,
  ws: null,
  statsTimer: null,
  last: null,       // previous /stats counters: {at, byId: Map id → [in, out]}
  retry: 1000,
};

function token() { return sessionStorage.getItem(KEY) || ""; }

function b64url(s) {
  const bytes = new TextEncoder().encode(s);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setStatus(text, cls) {
  const el = $("#status");
  el.textContent = text;
  el.className = "status " + cls;
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function rate(v) { return v === undefined ? "–" : v < 10 ? v.toFixed(1) : Math.round(v).toString(); }

function td(text, cls) {
  const el = document.createElement("td");
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function log(text) {
  const li = document.createElement("li");
  const t = document.createElement("time");
  t.textContent = new Date().toLocaleTimeString();
  li.append(t, text);
  const ol = $("#log");
  ol.prepend(li);
  while (ol.children.length > 200) ol.lastChild.remove();
}

function addReg(r) {
  const members = new Map();
  for (const m of r.members || []) members.set(m.conn, m);
  state.regs.set(r.id, { id: r.id, type: r.reg_type, created: r.created_at, members });
}

function onFrame(ev) {
  const f = JSON.parse(ev.data);
  switch (f.type) {
    case "snapshot":
      state.regs.clear();
      for (const r of f.registrations) addReg(r);
      log(`connected: ${f.registrations.length} registrations`);
      break;
    case "register":
      addReg({ id: f.registration, reg_type: f.reg_type, created_at: f.created_at });
      log(`registered ${f.registration} (${f.reg_type})`);
      break;
    case "remove":
      state.regs.delete(f.registration);
      if (state.selected === f.registration) state.selected = null;
      log(`removed ${f.registration}`);
      break;
    case "join": {
      const r = state.regs.get(f.registration);
      if (r) r.members.set(f.conn, memberOf(f));
      log(`${f.registration}: ${f.role} ${f.name || f.conn.slice(0, 8)} joined from ${f.remote_addr}`);
      break;
    }
    case "leave": {
      const r = state.regs.get(f.registration);
      if (r) r.members.delete(f.conn);
      log(`${f.registration}: ${f.role} ${f.name || f.conn.slice(0, 8)} left (${f.code})`);
      break;
    }
    case "subscribe":
    case "unsubscribe": {
      const m = state.regs.get(f.registration)?.members.get(f.conn);
      if (m) {
        const subs = new Set(m.subscriptions || []);
        f.type === "subscribe" ? subs.add(f.event) : subs.delete(f.event);
        m.subscriptions = [...subs];
      }
      break;
    }
  }
  render(f.type === "join" ? f.conn : null);
}

function memberOf(f) {
  return { conn: f.conn, role: f.role, name: f.name, remote_addr: f.remote_addr, connected_at: f.connected_at, subscriptions: f.subscriptions };
}

function render(flashConn) {
  const filter = $("#filter").value.trim().toLowerCase();
  const tbody = $("#regs tbody");
  const rows = [];
  let members = 0, rin = 0, rout = 0;
  const regs = [...state.regs.values()].sort((a, b) => b.created.localeCompare(a.created));
  for (const r of regs) {
    members += r.members.size;
    rin += r.rateIn || 0;
    rout += r.rateOut || 0;
    if (filter && !r.id.toLowerCase().includes(filter) && !r.type.includes(filter)) continue;
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    if (r.id === state.selected) tr.className = "selected";
    const id = document.createElement("td");
    const code = document.createElement("code");
    code.textContent = r.id;
    id.append(code);
    tr.append(id, td(r.type), td(String(r.members.size), "num members"), td(rate(r.rateIn), "num"), td(rate(r.rateOut), "num"), td(ago(r.created) + " ago"));
    tr.addEventListener("click", () => { state.selected = r.id; render(); });
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  $("#regs-empty").hidden = state.regs.size > 0;
  $("#reg-count").textContent = `(${state.regs.size})`;
  $("#totals").textContent = `${state.regs.size} registrations · ${members} members · ${rate(rin)} msgs/s in · ${rate(rout)} out`;

  const r = state.selected && state.regs.get(state.selected);
  $("#detail").hidden = !r;
  if (!r) return;
  $("#detail-id").textContent = r.id;
  $("#detail-type").textContent = r.type;
  const mrows = [];
  const ms = [...r.members.values()].sort((a, b) => (a.connected_at || "").localeCompare(b.connected_at || ""));
  for (const m of ms) {
    const tr = document.createElement("tr");
    tr.dataset.conn = m.conn;
    if (m.conn === flashConn) tr.className = "flash";
    const subs = document.createElement("td");
    subs.className = "subs";
    for (const s of m.subscriptions || []) {
      const c = document.createElement("code");
      c.textContent = s;
      subs.append(c);
    }
    tr.append(td(m.role), td(m.name || "–"), td(m.remote_addr || "–"), td(m.connected_at ? ago(m.connected_at) : "–"), subs, td(m.conn.slice(0, 12) + "…"));
    mrows.push(tr);
  }
  $("#members tbody").replaceChildren(...mrows);
  $("#members-empty").hidden = r.members.size > 0;
}

async function pollStats() {
  try {
    const resp = await fetch("/stats", { headers: { Authorization: "Bearer " + token() }, cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) return fail("the token was refused");
    if (!resp.ok) return;
    const s = await resp.json();
    const now = performance.now();
    const byId = new Map();
    for (const r of s.registrations) byId.set(r.id, [r.messages_in, r.messages_out]);
    if (state.last) {
      const dt = (now - state.last.at) / 1000;
      for (const [id, [i, o]] of byId) {
        const reg = state.regs.get(id), prev = state.last.byId.get(id);
        if (reg && prev && dt > 0) { reg.rateIn = (i - prev[0]) / dt; reg.rateOut = (o - prev[1]) / dt; }
      }
    }
    state.last = { at: now, byId };
    render();
  } catch (e) { /* the stream's status says whether the router is there */ }
}

function connectStream() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/info`, ["wsrouter.info", "bearer." + b64url(token())]);
  state.ws = ws;
  setStatus("connecting…", "off");
  ws.onopen = () => { setStatus("live", "on"); state.retry = 1000; };
  ws.onmessage = onFrame;
  ws.onclose = (e) => {
    if (state.ws !== ws) return;
    setStatus(e.code === 4008 ? "fell behind, reconnecting…" : "disconnected, reconnecting…", "bad");
    setTimeout(() => { if (state.ws === ws && token()) connectStream(); }, state.retry);
    state.retry = Math.min(state.retry * 2, 15000);
  };
}

function fail(msg) {
  stop();
  sessionStorage.removeItem(KEY);
  $("#login-error").textContent = msg;
  $("#login-error").hidden = false;
  showLogin();
}

function stop() {
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close();
  clearInterval(state.statsTimer);
  setStatus("not connected", "off");
}

function showLogin() {
  $("#login").hidden = false;
  $("#main").hidden = true;
  $("#logout").hidden = true;
}

async function start() {
  // /stats first: a WebSocket refused for a bad token only says "closed".
  const resp = await fetch("/stats", { headers: { Authorization: "Bearer " + token() }, cache: "no-store" }).catch(() => null);
  if (!resp) return fail("the router cannot be reached");
  if (resp.status === 404) return fail("this router has no admin token set (-admin-token)");
  if (!resp.ok) return fail(resp.status === 429 ? "too many wrong tokens: wait and try again" : "the token was refused");
  $("#login").hidden = true;
  $("#main").hidden = false;
  $("#logout").hidden = false;
  $("#login-error").hidden = true;
  connectStream();
  pollStats();
  state.statsTimer = setInterval(pollStats, 2000);
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("#token").value);
  $("#token").value = "";
  start();
});
$("#logout").addEventListener("click", () => { stop(); sessionStorage.removeItem(KEY); showLogin(); });
$("#filter").addEventListener("input", () => render());
setInterval(() => render(), 10000); // "since" columns age
if (token()) start(); else showLogin();
