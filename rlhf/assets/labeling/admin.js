"use strict";
(() => {
  const api = RLHF.makeApi("admin");
  const $ = id => document.getElementById(id);
  const fmt = v => v === null || v === undefined ? "—" : String(v);
  const pct = v => v === null || v === undefined ? "—" : (100 * v).toFixed(1) + "%";

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
        ["Open assignments", c.open_assignments], ["Kendall's W", fmt(c.kendalls_w) + " (" + c.items_with_w + " items)"],
        ["Pairwise agreement", pct(c.pairwise_agreement)], ["Consensus", c.consensus_method]];
      $("campaign-stats").replaceChildren(...stats.flatMap(([k, v]) => [RLHF.el("dt", {text: k}), RLHF.el("dd", {text: String(v)})]));
      const rows = s.labelers.map(l => RLHF.el("tr", {},
        RLHF.el("th", {scope: "row", text: l.labeler}),
        RLHF.el("td", {text: l.done + " of " + l.total}),
        RLHF.el("td", {text: String(l.skipped)}),
        RLHF.el("td", {text: fmt(l.median_seconds)}),
        RLHF.el("td", {text: pct(l.agreement_with_consensus)}),
        RLHF.el("td", {text: String(l.gold_items)}),
        RLHF.el("td", {text: pct(l.gold_agreement)})));
      $("labelers").tBodies[0].replaceChildren(...rows);
      $("overview").hidden = false;
      RLHF.status("Updated " + new Date().toLocaleTimeString());
    } catch (e) {
      RLHF.status(e.message, true);
    }
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
  $("campaign-select").addEventListener("change", refresh);
  $("add").addEventListener("click", addLabeler);
  $("new-name").addEventListener("keydown", ev => { if (ev.key === "Enter") addLabeler(); });
  $("export").addEventListener("click", () => download(false));
  $("export-consensus").addEventListener("click", () => download(true));
  refresh();
  setInterval(refresh, 15000);
})();
