"use strict";
(() => {
  const api = RLHF.makeApi("label");
  const $ = id => document.getElementById(id);
  // order: shown positions (indices into item.completions) from best to worst.
  // tieNext: positions tied with the completion directly below them.
  // touched: the labeler moved or tied something (an untouched shuffle asks for confirmation).
  // revising: the item on screen is the labeler's last answer, brought back to be changed.
  const state = {item: null, order: [], tieNext: new Set(), submissionId: null, busy: false, dragFrom: null,
                 touched: false, revising: false, progress: null, previous: null};

  function newId() {
    const a = new Uint8Array(12);
    crypto.getRandomValues(a);
    return Array.from(a, b => b.toString(16).padStart(2, "0")).join("");
  }

  function showProgress(p) {
    state.progress = p;
    $("progress").textContent = p.done + " of " + p.total;
  }

  function show(section) {
    for (const id of ["instructions", "task", "done"]) $(id).hidden = id !== section;
    $("show-instructions").hidden = section === "instructions";
    if (section !== "task") $("saved").hidden = true;
  }

  function excerpt(text, n) {
    const t = text.replace(/\s+/g, " ").trim();
    return t.length > n ? t.slice(0, n - 1) + "…" : t;
  }

  // After a submit the next item must look new: a green banner names what was saved, and the
  // prompt box flashes once (no motion for people who asked for less).
  function announceSaved(text) {
    $("saved-text").textContent = text;
    $("saved").hidden = false;
    const box = $("prompt");
    box.classList.remove("fresh");
    void box.offsetWidth;  // restart the animation
    box.classList.add("fresh");
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
    state.touched = true;
    hideConfirm();
    renderCards(slot);
  }

  function move(p, delta) { moveTo(p, p + delta); }

  function toggleTie(p) {
    if (p >= state.order.length - 1) return;
    const slot = state.order[p];
    if (state.tieNext.has(slot)) state.tieNext.delete(slot); else state.tieNext.add(slot);
    state.touched = true;
    hideConfirm();
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
    const prompt = state.item.prompt, revised = state.revising;
    try {
      const r = await post(Object.assign({item: state.item.id, submission_id: state.submissionId, revise: revised}, body));
      showProgress(r.progress);
      RLHF.status("");
      await loadNext();
      const what = revised ? "Changed your answer" : body.skipped ? "Skipped" : "Saved your ranking";
      announceSaved(what + " for “" + excerpt(prompt, 60) + "”." + (state.item ? " Next prompt below." : ""));
    } catch (e) {
      RLHF.status("Not saved: " + e.message, true);
    } finally {
      state.busy = false;
    }
  }

  function hideConfirm() { $("confirm-box").hidden = true; }

  function submitRanking(confirmed) {
    if (!state.touched && !confirmed && state.order.length > 1) {
      // The page's random order, untouched: most often a hurried click, so ask before storing it.
      $("skip-box").hidden = true;
      $("confirm-box").hidden = false;
      $("rank-first").focus();
      return;
    }
    hideConfirm();
    send({ranking: state.order.slice(), ties: tieGroups(), skipped: false});
  }

  function confirmSkip() {
    const kind = $("skip-kind").value;
    const note = $("skip-note").value.trim();
    const reason = note ? kind + ": " + note : kind;
    $("skip-box").hidden = true;
    send({ranking: [], ties: [], skipped: true, skip_reason: reason});
  }

  function showItem(item, order, ties, revising) {
    state.item = item;
    state.order = order;
    state.tieNext = new Set(ties.flatMap(g => g.slice(0, -1)));  // ties arrive as contiguous groups
    state.submissionId = newId();
    state.touched = revising;  // an answer brought back was ranked once already
    state.revising = revising;
    $("prompt").textContent = item.prompt;
    const p = state.progress;
    $("prompt-title").textContent = revising ? "Prompt of your last answer"
      : p ? "Prompt " + Math.min(p.done + 1, p.total) + " of " + p.total : "Prompt";
    $("revising").hidden = !revising;
    $("skip-box").hidden = true;
    hideConfirm();
    $("skip-note").value = "";
    $("back").hidden = revising || !state.previous;
    show("task");
    renderCards(state.order[0]);
  }

  async function loadNext() {
    const r = await api("GET", "/api/next");
    showProgress(r.progress);
    state.previous = r.previous;
    if (!r.item) {
      state.item = null;
      show("done");
      $("done-back").hidden = !state.previous;
      return;
    }
    showItem(r.item, r.item.completions.map((_, i) => i), [], false);
  }

  async function goBack() {
    if (state.busy) return;
    try {
      const r = await api("GET", "/api/previous");
      if (!r.item) {
        state.previous = null;
        $("back").hidden = true;
        RLHF.status("Your last answer can no longer be changed: its item has all its rankings now.", true);
        return;
      }
      const it = r.item;
      $("revising-note").textContent = it.skipped
        ? "You skipped it (" + (it.skip_reason || "no reason") + "). Rank it, or skip it again."
        : "It is shown as you ranked it. Change it and submit again.";
      RLHF.status("");
      $("saved").hidden = true;
      const order = it.skipped ? it.completions.map((_, i) => i) : it.ranking;
      showItem(it, order, it.skipped ? [] : it.ties, true);
    } catch (e) {
      RLHF.status(e.message, true);
    }
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
      // An instructions file that opens with its own title gives the page its heading, rather
      // than sitting under a generic "Instructions" with a second title of its own.
      let blocks = me.campaign.instructions;
      if (blocks.length && blocks[0].t === "h" && blocks[0].level === 1) {
        $("instructions-title").textContent = blocks[0].spans.map(sp => sp.s).join("");
        blocks = blocks.slice(1);
      }
      RLHF.renderBlocks($("instructions-body"), blocks);
      showProgress(me.progress);
      show("instructions");
      $("start").focus();
    } catch (e) {
      RLHF.status(e.message, true);
    }
  }

  $("start").addEventListener("click", () => loadNext().catch(e => RLHF.status(e.message, true)));
  $("show-instructions").addEventListener("click", () => { show("instructions"); $("start").textContent = "Back to labeling"; $("start").focus(); });
  $("submit").addEventListener("click", () => submitRanking(false));
  $("confirm-as-shown").addEventListener("click", () => submitRanking(true));
  $("rank-first").addEventListener("click", () => { hideConfirm(); renderCards(state.order[0]); });
  $("back").addEventListener("click", goBack);
  $("done-back").addEventListener("click", goBack);
  $("cancel-revise").addEventListener("click", () => loadNext().catch(e => RLHF.status(e.message, true)));
  $("skip").addEventListener("click", () => { hideConfirm(); $("skip-box").hidden = false; $("skip-kind").focus(); });
  $("cancel-skip").addEventListener("click", () => { $("skip-box").hidden = true; $("skip").focus(); });
  $("confirm-skip").addEventListener("click", confirmSkip);
  document.addEventListener("keydown", ev => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("task").hidden && $("skip-box").hidden
        && $("confirm-box").hidden) {
      ev.preventDefault();
      submitRanking(false);
    }
  });
  init();
})();
