"use strict";
(() => {
  const api = RLHF.makeApi("label");
  const $ = id => document.getElementById(id);
  // order: shown positions (indices into item.completions) from best to worst.
  // tieNext: positions tied with the completion directly below them.
  const state = {item: null, order: [], tieNext: new Set(), submissionId: null, busy: false, dragFrom: null};

  function newId() {
    const a = new Uint8Array(12);
    crypto.getRandomValues(a);
    return Array.from(a, b => b.toString(16).padStart(2, "0")).join("");
  }

  function showProgress(p) {
    $("progress").textContent = p.done + " of " + p.total;
  }

  function show(section) {
    for (const id of ["instructions", "task", "done"]) $(id).hidden = id !== section;
    $("show-instructions").hidden = section === "instructions";
  }

  function tieGroups() {
    const groups = [];
    let cur = [state.order[0]];
    for (let p = 1; p < state.order.length; p++) {
      if (state.tieNext.has(state.order[p - 1])) cur.push(state.order[p]);
      else { if (cur.length > 1) groups.push(cur); cur = [state.order[p]]; }
    }
    if (cur.length > 1) groups.push(cur);
    return groups;
  }

  function rankLabels() {
    const labels = [];
    let start = 0;
    for (let p = 0; p < state.order.length; p++) {
      const tiedAbove = p > 0 && state.tieNext.has(state.order[p - 1]);
      if (!tiedAbove) start = p;
      const tiedBelow = state.tieNext.has(state.order[p]) && p < state.order.length - 1;
      labels.push((tiedAbove || tiedBelow ? "=" : "") + (start + 1));
    }
    return labels;
  }

  function renderCards(focusSlot) {
    const list = $("cards");
    list.replaceChildren();
    const labels = rankLabels();
    const last = state.order.length - 1;
    state.order.forEach((slot, p) => {
      const tied = state.tieNext.has(slot);
      const card = RLHF.el("li", {class: "card" + (tied ? " tied" : ""), tabindex: 0, draggable: "true",
                                  "data-slot": slot, "aria-label": "Rank " + labels[p] + " of " + state.order.length});
      card.append(
        RLHF.el("span", {class: "rank", "aria-hidden": "true", text: labels[p]}),
        RLHF.el("div", {class: "text", text: state.item.completions[slot]}),
        RLHF.el("div", {class: "controls"},
          RLHF.el("button", {type: "button", class: "up", "aria-label": "Move up", disabled: p === 0,
                             onclick: () => move(p, -1), text: "↑"}),
          RLHF.el("button", {type: "button", class: "down", "aria-label": "Move down", disabled: p === last,
                             onclick: () => move(p, 1), text: "↓"}),
          RLHF.el("button", {type: "button", class: "tie", "aria-pressed": String(tied), disabled: p === last,
                             onclick: () => toggleTie(p), text: tied ? "Tied with next ✓" : "Tie with next"})));
      card.addEventListener("keydown", ev => onCardKey(ev, p));
      card.addEventListener("dragstart", ev => { state.dragFrom = p; ev.dataTransfer.effectAllowed = "move"; });
      card.addEventListener("dragover", ev => ev.preventDefault());
      card.addEventListener("drop", ev => { ev.preventDefault(); if (state.dragFrom !== null) moveTo(state.dragFrom, p); });
      list.append(card);
    });
    if (focusSlot !== undefined) {
      const target = list.querySelector('[data-slot="' + focusSlot + '"]');
      if (target) target.focus();
    }
  }

  // Moving a completion breaks the ties it had: a tie is a judgement about two neighbours.
  function clearTiesAround(p) {
    state.tieNext.delete(state.order[p]);
    if (p > 0) state.tieNext.delete(state.order[p - 1]);
  }

  function moveTo(from, to) {
    if (to < 0 || to >= state.order.length || from === to) return;
    const slot = state.order[from];
    clearTiesAround(from);
    state.order.splice(from, 1);
    state.order.splice(to, 0, slot);
    clearTiesAround(to);
    if (to + 1 < state.order.length) state.tieNext.delete(state.order[to + 1]);
    renderCards(slot);
  }

  function move(p, delta) { moveTo(p, p + delta); }

  function toggleTie(p) {
    if (p >= state.order.length - 1) return;
    const slot = state.order[p];
    if (state.tieNext.has(slot)) state.tieNext.delete(slot); else state.tieNext.add(slot);
    renderCards(slot);
  }

  function onCardKey(ev, p) {
    if (ev.target !== ev.currentTarget) return;  // keys on the card's own buttons act as buttons
    const up = ev.key === "ArrowUp", down = ev.key === "ArrowDown";
    if ((ev.shiftKey && (up || down)) || ev.key === "k" || ev.key === "j") {
      ev.preventDefault();
      move(p, up || ev.key === "k" ? -1 : 1);
    } else if (up || down) {
      ev.preventDefault();
      const cards = $("cards").children;
      const q = p + (up ? -1 : 1);
      if (q >= 0 && q < cards.length) cards[q].focus();
    } else if (ev.key === "t" || ev.key === "T") {
      ev.preventDefault();
      toggleTie(p);
    }
  }

  async function post(body) {
    // Retried with the same submission id: the server stores it once however often it arrives.
    // Retried: network failures (no status) and 503 (database busy; nothing was stored).
    for (let attempt = 0; ; attempt++) {
      try {
        return await api("POST", "/api/submit", body);
      } catch (e) {
        if ((e.status !== undefined && e.status !== 503) || attempt >= 4) throw e;
        await new Promise(r => setTimeout(r, 500 * (attempt + 1)));
      }
    }
  }

  async function send(body) {
    if (state.busy || !state.item) return;
    state.busy = true;
    RLHF.status("Saving…");
    try {
      const r = await post(Object.assign({item: state.item.id, submission_id: state.submissionId}, body));
      showProgress(r.progress);
      RLHF.status(body.skipped ? "Skipped." : "Saved.");
      await loadNext();
    } catch (e) {
      RLHF.status("Not saved: " + e.message, true);
    } finally {
      state.busy = false;
    }
  }

  function submitRanking() {
    send({ranking: state.order.slice(), ties: tieGroups(), skipped: false});
  }

  function confirmSkip() {
    const kind = $("skip-kind").value;
    const note = $("skip-note").value.trim();
    const reason = note ? kind + ": " + note : kind;
    $("skip-box").hidden = true;
    send({ranking: [], ties: [], skipped: true, skip_reason: reason});
  }

  async function loadNext() {
    const r = await api("GET", "/api/next");
    showProgress(r.progress);
    if (!r.item) { state.item = null; show("done"); return; }
    state.item = r.item;
    state.order = r.item.completions.map((_, i) => i);
    state.tieNext = new Set();
    state.submissionId = newId();
    $("prompt").textContent = r.item.prompt;
    $("skip-box").hidden = true;
    $("skip-note").value = "";
    show("task");
    renderCards(state.order[0]);
  }

  async function init() {
    if (!RLHF.token("label")) {
      RLHF.status("This page needs your personal link (it ends in #token=…). Ask the campaign admin for one.", true);
      return;
    }
    try {
      const me = await api("GET", "/api/me");
      $("campaign").textContent = me.campaign.name + " — " + me.labeler;
      $("criterion").textContent = me.campaign.criterion;
      RLHF.renderBlocks($("instructions-body"), me.campaign.instructions);
      showProgress(me.progress);
      show("instructions");
      $("start").focus();
    } catch (e) {
      RLHF.status(e.message, true);
    }
  }

  $("start").addEventListener("click", () => loadNext().catch(e => RLHF.status(e.message, true)));
  $("show-instructions").addEventListener("click", () => { show("instructions"); $("start").textContent = "Back to labeling"; $("start").focus(); });
  $("submit").addEventListener("click", submitRanking);
  $("skip").addEventListener("click", () => { $("skip-box").hidden = false; $("skip-kind").focus(); });
  $("cancel-skip").addEventListener("click", () => { $("skip-box").hidden = true; $("skip").focus(); });
  $("confirm-skip").addEventListener("click", confirmSkip);
  document.addEventListener("keydown", ev => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("task").hidden && $("skip-box").hidden) {
      ev.preventDefault();
      submitRanking();
    }
  });
  init();
})();
