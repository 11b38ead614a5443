"use strict";
// The chat page. Model output and history are only ever put into the page as text (RLHF.el's
// "text", textContent, textarea values), never through an HTML-parsing setter.
(() => {
  // A link /chat/<token>: keep the token for this tab only and show /chat instead.
  const m = /^\/chat\/([^/]+)$/.exec(location.pathname);
  if (m) {
    sessionStorage.setItem("rlhf-token-chat", decodeURIComponent(m[1]));
    history.replaceState(null, "", "/chat");
  }
  RLHF.token("chat");  // also accepts /chat#token=...
  const api = RLHF.makeApi("chat");
  const $ = id => document.getElementById(id);
  // turn: the open turn; picked: 0, 1, or null (both bad), undefined before a pick.
  const state = {turn: null, picked: undefined, submissionId: null, busy: false};

  function newId() {
    const a = new Uint8Array(12);
    crypto.getRandomValues(a);
    return Array.from(a, b => b.toString(16).padStart(2, "0")).join("");
  }

  const MODES = {adapter: "replies from your own tuned model", rerank: "replies picked for you by your reward model",
                 sample: "plain replies (no personal model yet)"};

  function showCounts(c) {
    $("count").textContent = c.answered + (c.answered === 1 ? " choice" : " choices");
  }

  async function loadMe() {
    const me = await api("GET", "/api/chat/me");
    $("who").textContent = "· " + me.user;
    $("mode").textContent = me.mode ? MODES[me.mode] || me.mode : "";
    showCounts(me);
  }

  // Retried with the same ids: the server stores a question and a choice once however often they arrive.
  async function send(method, path, body) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await api(method, path, body);
      } catch (e) {
        if ((e.status !== undefined && e.status !== 503) || attempt >= 4) throw e;
        await new Promise(r => setTimeout(r, 500 * (attempt + 1)));
      }
    }
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const id of ["ask", "save", "pick-0", "pick-1", "both-bad"]) $(id).disabled = busy;
  }

  async function ask(ev) {
    ev.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy) return;
    setBusy(true);
    RLHF.status("Writing two replies…");
    try {
      const r = await send("POST", "/api/chat/ask", {prompt, ask_id: newId()});
      openTurn(r.turn);
      $("prompt").value = "";
      RLHF.status("");
    } catch (e) {
      RLHF.status("Could not get replies: " + e.message, true);
    } finally {
      setBusy(false);
    }
  }

  function openTurn(turn) {
    state.turn = turn;
    state.picked = undefined;
    state.submissionId = newId();
    $("your-question").textContent = turn.prompt;
    for (const i of [0, 1]) {
      $("reply-" + i).querySelector(".text").textContent = turn.replies[i];
      $("reply-" + i).className = "reply";
      $("pick-" + i).setAttribute("aria-pressed", "false");
    }
    $("both-bad").setAttribute("aria-pressed", "false");
    $("edit-box").hidden = true;
    $("choice").hidden = false;
    $("ask-form").hidden = true;
    $("pick-0").focus();
  }

  function pick(choice) {
    state.picked = choice;
    for (const i of [0, 1]) {
      $("reply-" + i).className = "reply" + (choice === i ? " chosen" : choice === null || choice === 1 - i ? " rejected" : "");
      $("pick-" + i).setAttribute("aria-pressed", String(choice === i));
    }
    $("both-bad").setAttribute("aria-pressed", String(choice === null));
    $("edit-label").textContent = choice === null ? "Write the reply you would have wanted (optional)"
      : "Edit reply " + "AB"[choice] + " before saving (optional)";
    $("edit").value = choice === null ? "" : state.turn.replies[choice];
    $("edit-box").hidden = false;
    $("edit").focus();
  }

  async function save() {
    if (state.busy || !state.turn || state.picked === undefined) return;
    const text = $("edit").value.trim();
    const original = state.picked === null ? "" : state.turn.replies[state.picked].trim();
    const edit = text && text !== original ? text : null;
    setBusy(true);
    RLHF.status("Saving…");
    try {
      const r = await send("POST", "/api/chat/choose", {turn: state.turn.id, submission_id: state.submissionId,
                                                        choice: state.picked, edit});
      showCounts(r);
      addToTranscript(state.turn.prompt, edit || (state.picked === null ? null : original), edit !== null, state.picked);
      state.turn = null;
      $("choice").hidden = true;
      $("ask-form").hidden = false;
      $("prompt").focus();
      RLHF.status("Saved. Ask the next question whenever you like.");
    } catch (e) {
      RLHF.status("Not saved: " + e.message, true);
    } finally {
      setBusy(false);
    }
  }

  function addToTranscript(prompt, reply, edited, picked) {
    const note = reply === null ? "You marked both replies bad." : edited ? "Your edited version."
      : "You preferred reply " + "AB"[picked] + ".";
    $("transcript").append(
      RLHF.el("li", {}, RLHF.el("div", {class: "bubble user text", text: prompt})),
      RLHF.el("li", {}, RLHF.el("div", {class: "bubble assistant text"}, reply === null ? "" : reply,
                                RLHF.el("span", {class: "note", text: note}))));
  }

  // -- history ---------------------------------------------------------------------------------

  function describe(t) {
    if (!t.answered) return "not answered";
    return t.choice === null ? "both bad" : "preferred " + "AB"[t.choice];
  }

  function historyItem(t) {
    const replies = RLHF.el("div", {class: "replies"}, ...t.replies.map((text, i) =>
      RLHF.el("div", {class: t.choice === i ? "picked" : ""}, RLHF.el("strong", {text: "AB"[i] + ": "}), text)));
    const item = RLHF.el("li", {"data-turn": t.id},
      RLHF.el("div", {class: "meta"},
        RLHF.el("span", {text: new Date(1000 * t.asked_at).toLocaleString()}),
        RLHF.el("span", {class: "choice", text: describe(t)}),
        RLHF.el("span", {text: t.model_version}),
        RLHF.el("button", {type: "button", class: "delete", "aria-label": "Delete this entry",
                           onclick: () => deleteOne(t.id), text: "Delete"})),
      RLHF.el("div", {class: "q text", text: t.prompt}), replies);
    if (t.edit) item.append(RLHF.el("div", {class: "edited text"}, RLHF.el("strong", {text: "Your version: "}), t.edit));
    return item;
  }

  async function showHistory() {
    $("chat").hidden = true;
    $("history").hidden = false;
    $("show-history").hidden = true;
    RLHF.status("Loading your history…");
    try {
      const r = await api("GET", "/api/chat/history");
      $("history-list").replaceChildren(...r.turns.map(historyItem));
      $("history-empty").hidden = r.turns.length > 0;
      $("delete-all").disabled = r.turns.length === 0;
      RLHF.status("");
    } catch (e) {
      RLHF.status("Could not load your history: " + e.message, true);
    }
  }

  function showChat() {
    $("history").hidden = true;
    $("chat").hidden = false;
    $("show-history").hidden = false;
    (state.turn ? $("pick-0") : $("prompt")).focus();
  }

  async function deleteOne(id) {
    try {
      const r = await send("DELETE", "/api/chat/history/" + id);
      showCounts(r);
      await showHistory();
      RLHF.status("Deleted.");
    } catch (e) {
      RLHF.status("Not deleted: " + e.message, true);
    }
  }

  async function deleteAll() {
    if (!confirm("Delete your whole history? This cannot be undone.")) return;
    try {
      const r = await send("DELETE", "/api/chat/history");
      showCounts(r);
      $("transcript").replaceChildren();
      await showHistory();
      RLHF.status("Deleted " + r.deleted + (r.deleted === 1 ? " entry." : " entries."));
    } catch (e) {
      RLHF.status("Not deleted: " + e.message, true);
    }
  }

  $("ask-form").addEventListener("submit", ask);
  $("prompt").addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("pick-0").addEventListener("click", () => pick(0));
  $("pick-1").addEventListener("click", () => pick(1));
  $("both-bad").addEventListener("click", () => pick(null));
  $("save").addEventListener("click", save);
  $("edit").addEventListener("keydown", ev => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) save(); });
  $("show-history").addEventListener("click", showHistory);
  $("back-to-chat").addEventListener("click", showChat);
  $("delete-all").addEventListener("click", deleteAll);

  loadMe().then(() => $("prompt").focus()).catch(e => {
    RLHF.status(e.status === 401 ? "This link does not work (any more): ask for a new one." : "Could not start: " + e.message, true);
    $("ask").disabled = true;
  });
})();
