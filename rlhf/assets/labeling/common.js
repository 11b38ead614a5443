"use strict";
// Shared helpers. Data from the server is only ever put into the page as text
// (textContent, Text nodes, input values), never through an HTML-parsing setter, so model output
// cannot become markup (tests/test_feedback_app.py greps for those setters).
const RLHF = (() => {
  function token(kind) {
    const key = "rlhf-token-" + kind;
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(key, decodeURIComponent(m[1]));
      // Drop the token from the address bar so it is not left on screen or in screenshots.
      history.replaceState(null, "", location.pathname);
    }
    return sessionStorage.getItem(key);
  }

  function makeApi(kind) {
    return async function api(method, path, body) {
      const headers = {"Authorization": "Bearer " + (token(kind) || "")};
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const r = await fetch(path, {method, headers, cache: "no-store",
                                   body: body === undefined ? undefined : JSON.stringify(body)});
      const type = r.headers.get("content-type") || "";
      const data = type.includes("application/json") ? await r.json() : await r.text();
      if (!r.ok) {
        const e = new Error((data && data.error) || ("HTTP " + r.status));
        e.status = r.status;
        throw e;
      }
      return data;
    };
  }

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) e.append(c);  // strings become Text nodes
    return e;
  }

  function spans(list) {
    return list.map(s => s.t === "text" ? document.createTextNode(s.s)
      : el(s.t === "b" ? "strong" : s.t === "i" ? "em" : "code", {text: s.s}));
  }

  // Instructions arrive as a block tree (rlhf/feedback/pages.py), never as HTML.
  function renderBlocks(container, blocks) {
    container.replaceChildren();
    for (const b of blocks) {
      if (b.t === "h") container.append(el("h" + Math.min(6, b.level + 1), {}, ...spans(b.spans)));
      else if (b.t === "p") container.append(el("p", {}, ...spans(b.spans)));
      else if (b.t === "ul" || b.t === "ol") container.append(el(b.t, {}, ...b.items.map(it => el("li", {}, ...spans(it)))));
    }
  }

  function status(text, isError) {
    const s = document.getElementById("status");
    s.textContent = text || "";
    s.className = "status" + (isError ? " error" : "");
    s.setAttribute("role", isError ? "alert" : "status");
  }

  return {token, makeApi, el, renderBlocks, status};
})();
