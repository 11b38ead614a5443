"use strict";
(() => {
  const api = RLHF.makeApi("admin");
  const $ = id => document.getElementById(id);
  const fmt = v => v === null || v === undefined ? "—" : String(v);
  const pct = v => v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%";
  // Seconds with 2 significant digits: 0.0042, 1.8, 35 (scripted labelers answer in milliseconds).
  const secs = v => v === null || v === undefined ? "—" : v >= 10 ? String(Math.round(v)) : String(Number(v.toPrecision(2)));
  const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
  const letter = i => i < LETTERS.length ? LETTERS[i] : "#" + (i + 1);
  // W below this, any skip, or an answer submitted as shown puts an item on the "needs a look" list.
  const LOW_W = 0.5;
  const items = {list: [], open: null};

  function campaign() { return $("campaign-select").value; }

  async function loadCampaigns() {
    const r = await api("GET", "/api/admin/campaigns");
    const sel = $("campaign-select");
    const keep = sel.value;
    sel.replaceChildren(...r.campaigns.map(c => RLHF.el("option", {value: c.name, text: c.name})));
    if (keep) sel.value = keep;
  }

  async function refresh() {
    try {
      if (!$("campaign-select").options.length) await loadCampaigns();
      const s = await api("GET", "/api/admin/summary?campaign=" + encodeURIComponent(campaign()));
      const c = s.campaign;
      $("campaign-title").textContent = c.name + " (" + c.criterion + ")";
      const stats = [
        ["Items", c.items], ["Gold items", c.gold_items], ["Labels per item", c.labels_per_item],
        ["Labels stored", c.labels], ["Skipped", c.skipped], ["Items complete", c.items_complete + " of " + c.items],
        ["Open assignments", c.open_assignments], ["Kendall's W", fmt(c.kendalls_w) + " (" + c.items_with_w + (c.items_with_w === 1 ? " item)" : " items)")],
        ["Pairwise agreement", pct(c.pairwise_agreement)], ["Consensus", c.consensus_method]];
      $("campaign-stats").replaceChildren(...stats.flatMap(([k, v]) => [RLHF.el("dt", {text: k}), RLHF.el("dd", {text: String(v)})]));
      const rows = s.labelers.map(l => RLHF.el("tr", {},
        RLHF.el("th", {scope: "row", text: l.labeler}),
        RLHF.el("td", {text: l.done + " of " + l.total}),
        RLHF.el("td", {text: String(l.skipped)}),
        RLHF.el("td", {text: secs(l.median_seconds)}),
        RLHF.el("td", {text: pct(l.agreement_with_consensus)}),
        RLHF.el("td", {text: String(l.gold_items)}),
        RLHF.el("td", {text: pct(l.gold_agreement)}),
        RLHF.el("td", {class: l.as_shown > 0 && l.as_shown > 3 * l.as_shown_by_chance ? "warn" : "",
                       text: l.as_shown + " (" + l.as_shown_by_chance.toFixed(1) + ")"})));
      $("labelers").tBodies[0].replaceChildren(...rows);
      await loadItems();
      $("overview").hidden = false;
      RLHF.status("Updated " + new Date().toLocaleTimeString());
    } catch (e) {
      RLHF.status(e.message, true);
    }
  }

  // A ranking in original indices as letters: "B > A = C > D" (tied completions joined by "=").
  function rankingText(ranking, ties) {
    const tieOf = new Map();
    ties.forEach((g, gi) => g.forEach(c => tieOf.set(c, gi)));
    return ranking.map((c, p) => (p === 0 ? "" : tieOf.has(c) && tieOf.get(c) === tieOf.get(ranking[p - 1]) ? " = " : " > ")
                                 + letter(c)).join("");
  }

  function needsLook(it) {
    return it.skips > 0 || it.as_shown > 0 || (it.kendalls_w !== null && it.kendalls_w < LOW_W);
  }

  async function loadItems() {
    const r = await api("GET", "/api/admin/items?campaign=" + encodeURIComponent(campaign()));
    items.list = r.items;
    renderItems();
  }

  function renderItems() {
    const all = $("item-filter").value === "all";
    // Items that need a look first: lowest agreement, then most skips.
    const shown = items.list.filter(it => all || needsLook(it)).sort((a, b) =>
      (a.kendalls_w === null ? 2 : a.kendalls_w) - (b.kendalls_w === null ? 2 : b.kendalls_w) || b.skips - a.skips);
    $("item-count").textContent = shown.length + " of " + items.list.length + " items";
    $("items").tBodies[0].replaceChildren(...shown.map(it => RLHF.el("tr", {class: it.id === items.open ? "open" : ""},
      RLHF.el("th", {scope: "row", text: it.prompt_id + (it.gold ? " (gold)" : "")}),
      RLHF.el("td", {class: "clip", text: it.prompt}),
      RLHF.el("td", {text: it.rankings + " of " + it.labels_needed + (it.open_claims ? " (+" + it.open_claims + " open)" : "")}),
      RLHF.el("td", {class: it.kendalls_w !== null && it.kendalls_w < LOW_W ? "warn" : "", text: fmt(it.kendalls_w)}),
      RLHF.el("td", {class: it.skips ? "warn" : "", text: String(it.skips)}),
      RLHF.el("td", {class: it.as_shown ? "warn" : "", text: String(it.as_shown)}),
      RLHF.el("td", {}, RLHF.el("button", {type: "button", "aria-label": "Open item " + it.prompt_id,
                                           onclick: () => openItem(it.id), text: "Open"})))));
    if (items.open !== null) {
      const it = items.list.find(x => x.id === items.open);
      if (it) renderDetail(it);
    }
  }

  function openItem(id) {
    items.open = id;
    renderItems();
    $("item-detail").scrollIntoView({block: "nearest"});
  }

  function renderDetail(it) {
    $("detail-title").textContent = "Item " + it.prompt_id + (it.gold ? " (gold)" : "") + ": " + it.rankings + " of "
      + it.labels_needed + " rankings, Kendall's W " + fmt(it.kendalls_w);
    $("detail-prompt").textContent = it.prompt;
    $("detail-completions").replaceChildren(...it.completions.map(c => RLHF.el("li", {class: "text", text: c})));
    const rows = it.labels.map(l => RLHF.el("tr", {},
      RLHF.el("th", {scope: "row", text: l.labeler}),
      RLHF.el("td", {class: l.skipped ? "muted" : "", text: l.skipped ? "skipped" : rankingText(l.ranking, l.ties)}),
      RLHF.el("td", {text: secs(l.seconds)}),
      RLHF.el("td", {text: [l.skipped ? "reason: " + (l.skip_reason || "none given") : "",
                            l.as_shown ? "submitted as shown" : "",
                            l.gold_agreement !== undefined ? "gold agreement " + pct(l.gold_agreement) : ""]
                             .filter(Boolean).join("; ")})));
    if (it.consensus) rows.push(RLHF.el("tr", {class: "consensus"}, RLHF.el("th", {scope: "row", text: "consensus (Borda)"}),
      RLHF.el("td", {text: rankingText(it.consensus.ranking, it.consensus.ties)}), RLHF.el("td", {text: ""}), RLHF.el("td", {text: ""})));
    if (it.gold) rows.push(RLHF.el("tr", {class: "consensus"}, RLHF.el("th", {scope: "row", text: "known order (gold)"}),
      RLHF.el("td", {text: rankingText(it.gold_ranking, it.gold_ties || [])}), RLHF.el("td", {text: ""}), RLHF.el("td", {text: ""})));
    $("detail-labels").tBodies[0].replaceChildren(...rows);
    $("item-detail").hidden = false;
  }

  async function addLabeler() {
    const name = $("new-name").value.trim();
    if (!name) { RLHF.status("Type a name first.", true); return; }
    try {
      const r = await api("POST", "/api/admin/labelers", {name, campaign: campaign()});
      $("new-link").value = r.link;
      $("new-link-row").hidden = false;
      $("new-name").value = "";
      $("new-link").focus();
      $("new-link").select();
      refresh();
    } catch (e) {
      RLHF.status(e.message, true);
    }
  }

  async function download(consensus) {
    try {
      const body = await api("GET", "/api/admin/export?consensus=" + consensus + "&campaign=" + encodeURIComponent(campaign()));
      const url = URL.createObjectURL(new Blob([body], {type: "application/x-ndjson"}));
      const a = RLHF.el("a", {href: url, download: campaign() + (consensus ? "-consensus" : "-rankings") + ".jsonl"});
      document.body.append(a);
      a.click();
      a.remove();
      URL.revokeObjectURL(url);
    } catch (e) {
      RLHF.status(e.message, true);
    }
  }

  if (!RLHF.token("admin")) {
    RLHF.status("This page needs the admin link (it ends in #token=…): run `rlhf label add-admin NAME`.", true);
    return;
  }
  $("refresh").addEventListener("click", refresh);
  $("campaign-select").addEventListener("change", () => { items.open = null; $("item-detail").hidden = true; refresh(); });
  $("item-filter").addEventListener("change", renderItems);
  $("add").addEventListener("click", addLabeler);
  $("new-name").addEventListener("keydown", ev => { if (ev.key === "Enter") addLabeler(); });
  $("export").addEventListener("click", () => download(false));
  $("export-consensus").addEventListener("click", () => download(true));
  refresh();
  setInterval(refresh, 15000);
})();
