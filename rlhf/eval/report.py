"""One self-contained HTML report per run (plots embedded as PNG data URIs, also saved beside it).

Readable offline: no scripts, no external assets. Every text from a model or a user is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.utils.io import atomic_write_bytes, atomic_write_text

# PPO metric keys worth a curve, in display order; curves are drawn for whichever are present.
CURVES = [("score_mean", "score (optimised reward)"), ("gold_mean", "gold judge (held out)"), ("kl", "KL from reference"),
          ("beta", "β (KL coefficient)"), ("response_length", "response length (tokens)")]


@dataclass
class ReportInput:
    title: str
    metrics: list[dict] = field(default_factory=list)         # PPO metrics.jsonl rows
    eval_json: dict | None = None                              # EvalResult.to_json()
    samples: list[dict] = field(default_factory=list)          # {"prompt", "<model name>": text, ...}
    lineage: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)             # reward-hacking or other warnings
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _plot(rows: list[dict], key: str, label: str) -> bytes | None:
    xs = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
    ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if len(xs) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, linewidth=1.5)
    ax.set_xlabel("PPO step")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def write_report(out_dir: str | Path, data: ReportInput) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(data.title)}</h1>"]
    if data.flags:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in data.flags)
        parts.append(f'<div class="flag"><h2>Warnings</h2><ul>{items}</ul></div>')
    if data.notes:
        parts.append("".join(f"<p class='note'>{html.escape(n)}</p>" for n in data.notes))
    if data.summary:
        parts.append("<h2>Summary</h2>" + _table(["what", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                                     for k, v in data.summary.items()]))
    plots = []
    for key, label in CURVES:
        png = _plot(data.metrics, key, label)
        if png is not None:
            atomic_write_bytes(out_dir / f"{key}.png", png)
            plots.append(f'<figure><img alt="{html.escape(label)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                         f"<figcaption>{html.escape(label)}</figcaption></figure>")
    if plots:
        parts.append("<h2>Training curves</h2><div class='plots'>" + "".join(plots) + "</div>")
    if data.eval_json:
        rows = [[r["judge"], r["model"], r["mean"], r["std"], f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                 "" if r["improvement_pct"] is None else f"{r['improvement_pct']:+.1f}%",
                 "" if r["ci_separated_from_first"] is None else ("yes" if r["ci_separated_from_first"] else "no")]
                for r in data.eval_json["table"]]
        parts.append("<h2>Before and after (independent judges)</h2>"
                     "<p>Mean ± std over held-out prompts with the same sampling seeds; 95% bootstrap confidence "
                     "intervals; change is relative to the first model, positive = better.</p>"
                     + _table(["judge", "model", "mean", "std", "95% CI", "change", "CIs separate"], rows))
        kl_rows = [[m["name"], m["kl"]["mean"] if m["kl"] else None,
                    m["ref_perplexity"]["mean"] if m["ref_perplexity"] else None] for m in data.eval_json["models"]]
        parts.append(_table(["model", "KL from reference (nats/seq)", "reference perplexity"], kl_rows))
    if data.samples:
        names = [k for k in data.samples[0] if k != "prompt"]
        parts.append("<h2>Samples side by side</h2>" + _table(["prompt", *names], [[s["prompt"], *[s[n] for n in names]]
                                                                                  for s in data.samples]))
    if data.lineage:
        parts.append("<h2>Lineage</h2><pre>" + html.escape(json.dumps(data.lineage, indent=2, default=str)) + "</pre>")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}
th{{background:#f3f3f3}}.plots{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0}}figcaption{{font-size:12px;color:#555}}
.flag{{background:#fff3f3;border:1px solid #e99;padding:0 1em}}.note{{background:#f5f8ff;border-left:4px solid #88a;padding:6px 10px}}
pre{{background:#f7f7f7;padding:1em;overflow-x:auto}}</style></head><body>{''.join(parts)}</body></html>"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
