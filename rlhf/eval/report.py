"""One self-contained HTML report per run (plots embedded as PNG data URIs, also saved beside it).

It opens with the verdict (rlhf/eval/verdict.py): did the tuned model get better by each judge,
grouped by what the judge is to the training (optimised, gold, independent, drift), how far it
moved from the reference, and what the over-optimisation watch and the gold curve showed. The
curves, the full before/after table, samples with every judge's score, and the lineage follow.

Readable offline: no scripts, no external assets. Every text from a model or a user is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.eval.plots import training_plots
from rlhf.eval.verdict import (ROLE_TITLES, ROLES, JudgeVerdict, agreement_sentences, arrow, gao_sentence, gold_story,
                               headline, judge_verdicts, kl_sentence, magnitude_interval, number, watch_sentences)
from rlhf.utils.io import atomic_write_bytes, atomic_write_text


@dataclass
class TrainingInfo:
    """What the report needs to know about the PPO run behind the curves."""

    target_kl: float | None = None
    kl_ceiling: float | None = None
    kl_last: float | None = None          # PPO's last step, nats per reply
    gold_judge: str | None = None         # the watch's gold judge (a judge name in eval.json)
    gold_higher_is_better: bool = True
    watch: dict | None = None             # the watch summary: flags, best_gold_step, gao_fit
    best_gold_path: str | None = None     # where the policy from the gold peak was saved
    reward_units: str = "reward units"


@dataclass
class ReportInput:
    title: str
    metrics: list[dict] = field(default_factory=list)         # PPO metrics.jsonl rows
    eval_json: dict | None = None                              # EvalResult.to_json()
    samples: list[dict] = field(default_factory=list)          # {"prompt", "<model name>": text, ..., "scores": {...}}
    lineage: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)             # reward-hacking or other warnings
    summary: dict[str, Any] = field(default_factory=dict)      # run facts
    notes: list[str] = field(default_factory=list)
    judge_labels: dict[str, str] = field(default_factory=dict)  # judge name -> what a person reads
    model_labels: dict[str, str] = field(default_factory=dict)  # model name -> e.g. "base model"
    training: TrainingInfo | None = None


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(headers: list[str], rows: list, cls: str = "") -> str:
    """Rows are lists of cells, or a whole ready-made <tr> (Html) such as a group heading."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(r if isinstance(r, Html) else "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Html(str):
    """Markup built here from escaped parts; _cell passes it through unescaped."""


def _cell(v: Any) -> str:
    if isinstance(v, Html):
        return v
    if isinstance(v, float):
        return _e(number(v))
    return "" if v is None else _e(v)


def _badge(word: str) -> Html:
    cls = {"better": "better", "worse": "worse"}.get(word, "neutral")
    return Html(f"<span class='badge {cls}'>{_e(word)}</span>")


def _verdict_section(data: ReportInput, verdicts: list[JudgeVerdict]) -> str:
    parts = ["<section id='verdict'><h2>Verdict</h2>"]
    if verdicts:
        models = [m["name"] for m in data.eval_json["models"]]
        before, after = (data.model_labels.get(m, m) for m in (models[0], models[-1]))
        compared = ("tuned against base model" if (before, after) == ("base model", "tuned model")
                    else f"{after} against {before}")
        parts.append(f"<p class='headline'>{_e(headline(verdicts, compared))}</p>")
        parts.append(f"<p class='help'>{_e(after[:1].upper() + after[1:])} against {_e(before)}, on held-out prompts with the same sampling "
                     "seeds. “Better” or “worse” only where the 95% bootstrap interval of the paired change excludes "
                     "zero.</p>")
        for role in ROLES:
            group = [v for v in verdicts if v.role == role]
            if not group:
                continue
            items = "".join(f"<li>{_badge(v.word)} <strong>{_e(v.label)}</strong>: {_e(number(v.before))} → "
                            f"{_e(number(v.after))}, {_e(v.change_text())}; {_e(v.direction)}.</li>" for v in group)
            parts.append(f"<h3>{_e(ROLE_TITLES[role])}</h3><ul class='verdicts'>{items}</ul>")
    facts = verdict_facts(data)
    if facts:
        cls = "flag" if data.flags else "facts"
        parts.append(f"<h3>Distance from the reference, and over-optimisation</h3><ul class='{cls}'>"
                     + "".join(f"<li>{_e(f)}</li>" for f in facts) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def verdict_facts(data: ReportInput) -> list[str]:
    """The verdict's sentences after the judges: KL, the reward's agreement with the gold judge on each
    model's replies, the watch's flags, the gold curve, the Gao fit."""
    t = data.training or TrainingInfo()
    facts = [kl_sentence(_final_kl(data), t.target_kl, t.kl_ceiling)]
    if data.eval_json:
        facts += agreement_sentences(data.eval_json.get("reward_agreement", []), data.judge_labels, data.model_labels)
    if data.metrics and (t.watch is not None or data.flags):
        gold_label = data.judge_labels.get(t.gold_judge, "the gold judge") if t.gold_judge else "the gold judge"
        story = gold_story(data.metrics, t.gold_higher_is_better)
        facts += watch_sentences(story, data.flags, t.best_gold_path, gold_label)
        facts.append(gao_sentence((t.watch or {}).get("gao_fit"), t.kl_last))
    return [f for f in facts if f]


def _final_kl(data: ReportInput) -> float | None:
    if not data.eval_json:
        return None
    kls = [m["kl"]["mean"] for m in data.eval_json["models"] if m.get("kl")]
    return kls[-1] if len(kls) > 1 else None


def _judge_table(data: ReportInput) -> str:
    ev = data.eval_json
    models = [m["name"] for m in ev["models"]]
    rows = {(r["judge"], r["model"]): r for r in ev["table"]}
    roles = ev.get("roles", {})
    name = lambda m: data.model_labels.get(m, m)  # noqa: E731
    headers = ["judge", "direction", *[name(m) for m in models]]
    if len(models) > 1:
        headers += [f"change ({name(models[-1])} − {name(models[0])})", "verdict"]
    body = []
    for role in ROLES:
        judges = [j for j in ev["judges"] if roles.get(j, "independent") == role]
        if judges:
            body.append(Html(f"<tr class='group'><th colspan='{len(headers)}'>{_e(ROLE_TITLES[role])}</th></tr>"))
        for j in judges:
            label = data.judge_labels.get(j, j)
            cells: list[Any] = [Html(_e(label) + (f"<div class='spec'>{_e(j)}</div>" if label != j else "")),
                                "drift signal" if role == "drift" else "higher is better" if ev["judges"][j] else "lower is better"]
            for m in models:
                r = rows[(j, m)]
                cells.append(Html(f"{_e(number(r['mean']))} <span class='ci'>[{_e(number(r['ci_low']))}, "
                                  f"{_e(number(r['ci_high']))}]</span>"))
            last = rows[(j, models[-1])]
            if "change" in last:
                lo, hi = magnitude_interval(last["change"], last["change_ci_low"], last["change_ci_high"])
                cells.append(Html(f"{_e(arrow(last['change']))} {_e(number(abs(last['change'])))} <span class='ci'>"
                                  f"[{_e(number(lo))}, {_e(number(hi))}]</span>"))
                cells.append(_badge(last["verdict"]))
            body.append(cells)
    kl_rows = [[name(m["name"]),
                Html(f"{_e(number(m['kl']['mean']))} <span class='ci'>[{_e(number(m['kl']['ci_low']))}, "
                     f"{_e(number(m['kl']['ci_high']))}]</span>") if m.get("kl") else "",
                number(m["ref_perplexity"]["mean"]) if m.get("ref_perplexity") else ""] for m in ev["models"]]
    return ("<h2>Before and after, every judge</h2><p class='help'>Mean over held-out prompts with the same sampling "
            "seeds, its 95% bootstrap interval in brackets; the change is the raw difference of the means with the "
            "interval of the paired differences, in the direction of its arrow. Direction says which way is better "
            "for that judge.</p>" + _table(headers, body, "judges") + "<h3>Distance from the reference</h3>"
            + _table(["model", "KL from reference (nats per reply) [95% CI]", "reference perplexity of its replies"], kl_rows))


def _samples(data: ReportInput) -> str:
    names = [k for k in data.samples[0] if k not in ("prompt", "scores")]
    rows = []
    for s in data.samples:
        cells: list[Any] = [s["prompt"]]
        for n in names:
            scores = (s.get("scores") or {}).get(n, {})
            score_list = "".join(f"<li>{_e(data.judge_labels.get(j, j))}: <b>{_e(number(v))}</b></li>" for j, v in scores.items())
            cells.append(Html(f"<div class='reply'>{_e(s[n])}</div>" + (f"<ul class='scores'>{score_list}</ul>" if score_list else "")))
        rows.append(cells)
    return ("<h2>Samples side by side</h2><p class='help'>The first sample of each held-out prompt, with every judge's "
            "score of that reply.</p>" + _table(["prompt", *[data.model_labels.get(n, n) for n in names]], rows, "samples"))


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}tr.group th{background:#e8ecf5;font-size:15px;padding-top:8px}.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #ddd}figcaption{font-size:14px;color:#333;margin-top:4px}
#verdict{background:#fafbff;border:1px solid #cdd5ea;border-radius:8px;padding:.2em 1.2em 1em}
.headline{font-size:1.15em;font-weight:600}.verdicts li,.facts li,.flag li{margin:.3em 0}
.flag{background:#fff3f3;border:1px solid #e99;padding:.5em 1em .5em 2em}
.badge{display:inline-block;min-width:9em;text-align:center;border-radius:4px;padding:0 .4em;font-size:.9em;font-weight:600}
.badge.better{background:#dff3e4;color:#14532d}.badge.worse{background:#fde2e1;color:#7f1d1d}.badge.neutral{background:#eceff3;color:#333}
.ci{color:#666;font-size:.9em}.spec{color:#777;font-size:12px;word-break:break-all}.help{color:#555}
.note{background:#f5f8ff;border-left:4px solid #88a;padding:6px 10px}
.samples td{max-width:420px}.reply{white-space:pre-wrap}.scores{margin:.4em 0 0;padding-left:1.1em;font-size:12px;color:#444}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}"""


def write_report(out_dir: str | Path, data: ReportInput) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts = judge_verdicts(data.eval_json, data.judge_labels) if data.eval_json else []
    parts = [f"<h1>{_e(data.title)}</h1>", _verdict_section(data, verdicts)]
    if data.notes:
        parts.append("".join(f"<p class='note'>{_e(n)}</p>" for n in data.notes))
    t = data.training or TrainingInfo()
    story = gold_story(data.metrics, t.gold_higher_is_better)
    gold_label = data.judge_labels.get(t.gold_judge, "gold judge") if t.gold_judge else "gold judge"
    figures = []
    for plot in training_plots(data.metrics, story, t.target_kl, t.kl_ceiling, t.reward_units, gold_label):
        atomic_write_bytes(out_dir / f"{plot.key}.png", plot.png)
        figures.append(f'<figure><img alt="{_e(plot.title)}" src="data:image/png;base64,{base64.b64encode(plot.png).decode()}">'
                       f"<figcaption>{_e(plot.caption)}</figcaption></figure>")
    if figures:
        parts.append("<h2>Training curves</h2><div class='plots'>" + "".join(figures) + "</div>")
    if data.eval_json:
        parts.append(_judge_table(data))
    if data.samples:
        parts.append(_samples(data))
    if data.summary:
        parts.append("<h2>Run facts</h2>" + _table(["what", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                                     for k, v in data.summary.items()]))
    if data.lineage:
        parts.append("<h2>Lineage</h2><pre>" + _e(json.dumps(data.lineage, indent=2, default=str)) + "</pre>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(data.title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
