"""What a run's numbers mean, in words: the verdict a report opens with and the demo prints.

Pure functions over the JSON the stages write (eval.json rows, PPO metrics rows, the watch
summary), so the HTML report and the terminal say the same thing in the same words.

Judges fall into four groups, because "the model got better" means something different for each:

* **optimised** — the reward PPO maximised. It rising says the optimiser worked, nothing more.
* **gold** — held out from the policy, but it is what the labelers ranked by, so it measures
  how well the reward model stood in for them (and falls first when the policy games it).
* **independent** — never used in training; the only honest evidence of improvement.
* **drift** — signals such as reply length whose change is neither good nor bad by itself; a
  report shows their direction and never calls it better.

A change is "better" or "worse" only when the 95% bootstrap interval of the paired change (same
prompts, same seeds) excludes zero; otherwise it is "no clear change".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("optimised", "gold", "independent", "drift")
ROLE_TITLES = {
    "optimised": "Optimised: what PPO maximised",
    "gold": "Gold: held out from the policy, but what the labelers ranked by",
    "independent": "Independent: never used in training",
    "drift": "Drift signals: a change here is neither good nor bad by itself",
}
# Share of the gold judge's gain (first evaluation → peak) that must be lost again by the end
# before the report calls it a fall. Smaller dips are within one batch's noise in our runs.
GOLD_FALL_SHARE = 0.25


def number(x: float | None) -> str:
    """Three decimals, fewer for large values (lengths, perplexities), two significant digits below
    0.01 (so an interval bound of 0.0004 never reads "0.000", nor −0.00002 "-0.000")."""
    if x is None:
        return "—"
    ax = abs(x)
    if ax == 0:
        return "0.000"
    if ax < 0.01:
        return f"{x:.{min(7, 1 - math.floor(math.log10(ax)))}f}"
    return f"{x:.0f}" if ax >= 1000 else f"{x:.1f}" if ax >= 10 else f"{x:.3f}"


def arrow(change: float) -> str:
    return "↑" if change > 0 else "↓" if change < 0 else "→"


def magnitude_interval(change: float, ci_low: float, ci_high: float) -> tuple[float, float]:
    """The change's interval in the direction its arrow points (so "↓ 0.2 (0.19 to 0.21)", never negative bounds for ↓)."""
    lo, hi = sorted((ci_low, ci_high))
    return (-hi, -lo) if change < 0 else (lo, hi)


def change_word(change: float, ci_low: float, ci_high: float, higher_is_better: bool, role: str) -> str:
    """better / worse / no clear change; for drift signals rose / fell / no clear change."""
    if ci_low <= 0.0 <= ci_high:
        return "no clear change"
    if role == "drift":
        return "rose" if change > 0 else "fell"
    return "better" if (change > 0) == higher_is_better else "worse"


@dataclass
class JudgeVerdict:
    judge: str                 # the judge's name (scorer spec)
    label: str                 # what a person reads
    role: str
    higher_is_better: bool
    before: float
    after: float
    change: float              # after − before, in the judge's units
    ci_low: float              # 95% bootstrap interval of the paired change
    ci_high: float
    word: str

    @property
    def direction(self) -> str:
        if self.role == "drift":
            return "a drift signal"
        return "higher is better" if self.higher_is_better else "lower is better"

    def change_text(self) -> str:
        """"↓ 0.206 (95% CI 0.165 to 0.249)": the raw change with an arrow, the interval in the arrow's direction."""
        lo, hi = magnitude_interval(self.change, self.ci_low, self.ci_high)
        return f"{arrow(self.change)} {number(abs(self.change))} (95% CI {number(lo)} to {number(hi)})"

    def sentence(self) -> str:
        return (f"{self.label}: {self.word} — {number(self.before)} → {number(self.after)}, "
                f"{self.change_text()}; {self.direction}.")


def judge_verdicts(eval_json: dict, labels: dict[str, str] | None = None) -> list[JudgeVerdict]:
    """One verdict per judge for the last model against the first, ordered by role."""
    labels = labels or {}
    roles = eval_json.get("roles", {})
    models = [m["name"] for m in eval_json["models"]]
    if len(models) < 2:
        return []
    rows = {(r["judge"], r["model"]): r for r in eval_json["table"]}
    out = []
    for judge, higher in eval_json["judges"].items():
        before, after = rows[(judge, models[0])], rows[(judge, models[-1])]
        role = roles.get(judge, "independent")
        change = after["mean"] - before["mean"]
        lo, hi = after.get("change_ci_low", change), after.get("change_ci_high", change)
        out.append(JudgeVerdict(judge, labels.get(judge, judge), role, higher, before["mean"], after["mean"], change,
                                lo, hi, change_word(change, lo, hi, higher, role)))
    return sorted(out, key=lambda v: ROLES.index(v.role) if v.role in ROLES else len(ROLES))


def headline(verdicts: list[JudgeVerdict], compared: str = "tuned against base model") -> str:
    """One sentence over the independent judges: the answer to "did alignment work?"."""
    independent = [v for v in verdicts if v.role == "independent"]
    if not independent:
        return "No independent judge was run, so this report cannot say whether the model improved beyond its own reward."
    short = lambda v: v.label.split(" (")[0]  # noqa: E731  "toxicity (alt-profanity-check)" -> "toxicity"
    counts = {w: [short(v) for v in independent if v.word == w] for w in ("better", "worse", "no clear change")}
    parts = [f"{len(names)} {w} ({', '.join(names)})" for w, names in counts.items() if names]
    return f"Independent judges, {compared}: {'; '.join(parts)}."


def kl_sentence(kl: float | None, target_kl: float | None = None, kl_ceiling: float | None = None) -> str | None:
    if kl is None:
        return None
    if kl < 0.01:  # the per-sequence k1 estimate dips below zero when the two models barely differ
        text = (f"The tuned model has not measurably moved from the reference (KL estimate {number(kl)} nats per reply "
                "on the held-out prompts)")
    else:
        text = f"The tuned model moved {number(kl)} nats per reply away from the reference (KL, on the held-out prompts)"
    if target_kl is not None:
        text += f"; the KL controller aimed at {number(target_kl)}"
    if kl_ceiling is not None:
        text += f" and PPO would have stopped above {number(kl_ceiling)}"
    return text + "."


@dataclass
class GoldStory:
    """What the gold judge did during PPO, from the metrics rows that carry it."""

    first_step: int
    first: float
    peak_step: int
    peak: float
    last_step: int
    last: float
    proxy_at_peak: float | None
    proxy_last: float | None
    higher_is_better: bool

    @property
    def gain(self) -> float:
        """How far the gold judge improved from the first evaluation to its peak (≥ 0, in its units)."""
        return (self.peak - self.first) * (1 if self.higher_is_better else -1)

    @property
    def given_back(self) -> float:
        """Share of that gain lost again by the end (0 when it ended at its peak)."""
        drop = (self.peak - self.last) * (1 if self.higher_is_better else -1)
        return drop / self.gain if self.gain > 0 else 0.0

    @property
    def proxy_kept_rising(self) -> bool:
        return self.proxy_at_peak is not None and self.proxy_last is not None and self.proxy_last > self.proxy_at_peak

    @property
    def fell_after_peak(self) -> bool:
        return self.peak_step < self.last_step and self.gain > 0 and self.given_back > GOLD_FALL_SHARE


def gold_story(metrics: list[dict], higher_is_better: bool = True, gold_key: str = "gold_mean",
               proxy_key: str = "score_mean") -> GoldStory | None:
    points = [r for r in metrics if isinstance(r.get(gold_key), (int, float))]
    if len(points) < 2:
        return None
    sign = 1 if higher_is_better else -1
    peak = max(points, key=lambda r: sign * r[gold_key])  # the first of equal peaks
    first, last = points[0], points[-1]
    return GoldStory(first["step"], first[gold_key], peak["step"], peak[gold_key], last["step"], last[gold_key],
                     peak.get(proxy_key), last.get(proxy_key), higher_is_better)


def watch_sentences(story: GoldStory | None, flags: list[str], best_gold_path: str | None = None,
                    gold_label: str = "the gold judge") -> list[str]:
    """What the over-optimisation watch saw, and what the gold curve shows even where it raised no flag."""
    out = []
    if flags:
        out.append(f"The over-optimisation watch raised {len(flags)} flag{'s' if len(flags) > 1 else ''}: " + "; ".join(flags) + ".")
    else:
        out.append("The over-optimisation watch raised no flag.")
    if story is None:
        return out
    if story.peak_step == story.last_step:
        out.append(f"{gold_label.capitalize()} was at its best at the last evaluation (step {story.last_step}: "
                   f"{number(story.first)} → {number(story.last)}): no sign that the policy over-optimised its reward.")
        return out
    if story.peak_step == story.first_step:
        text = (f"{gold_label.capitalize()} never rose above its first evaluation (step {story.first_step}: "
                f"{number(story.first)}) and ended at {number(story.last)} at step {story.last_step}")
        if story.proxy_kept_rising:
            text += (f", while the optimised score rose ({number(story.proxy_at_peak)} → {number(story.proxy_last)}): "
                     "what PPO optimised did not carry the gold judge's preference")
        out.append(text + ".")
        return out
    text = (f"{gold_label.capitalize()} peaked at step {story.peak_step} ({number(story.peak)}, up from "
            f"{number(story.first)}) and ended at {number(story.last)} at step {story.last_step}")
    if story.fell_after_peak:
        text += f", giving back {story.given_back:.0%} of its gain"
        if story.proxy_kept_rising:
            text += (f" while the optimised score kept rising ({number(story.proxy_at_peak)} → {number(story.proxy_last)}). "
                     "That is the signature of over-optimisation: after the peak the policy pleased the reward model "
                     "in ways the labelers' preference does not share")
        text += "."
        if not flags:
            text += (" The watch flags only an unbroken run of falling evaluations, so it did not stop this run;"
                     " consider fewer steps or a larger KL penalty.")
        if best_gold_path:
            text += f" The policy from the gold peak is saved in {best_gold_path}."
    else:
        text += f", within {story.given_back:.0%} of its peak gain: no clear fall."
    out.append(text)
    return out


def gao_sentence(fit: dict | None, final_kl: float | None = None) -> str | None:
    """Gao et al.'s fit of gold against √KL, in words: where it predicts the gold peak, if the data pin it down."""
    if not fit:
        return None
    if not fit.get("well_determined"):
        why = fit.get("why", "too few or too noisy gold evaluations")
        return f"Gao et al.'s over-optimisation law was fitted to the gold evaluations but is not well determined ({why}), so no peak is reported."
    peak_kl = fit["peak_kl"]
    text = (f"Fitted to the gold evaluations, Gao et al.'s law gold ≈ d·(α − β·ln d), d = √KL, predicts the gold judge "
            f"is best at a KL of about {number(peak_kl)} nats per reply; optimising beyond that should lower it")
    if final_kl is not None:
        text += (f". This run ended at {number(final_kl)}, " +
                 ("before that point." if final_kl < peak_kl else "past that point."))
    else:
        text += "."
    return text


def agreement_sentences(rows: list[dict], labels: dict[str, str] | None = None,
                        model_labels: dict[str, str] | None = None) -> list[str]:
    """EvalResult.reward_agreement() in words: how often the reward picks the reply the gold judge
    picks, on the first model's replies and on the last's, and whether that fell where the policy went."""
    labels, model_labels = labels or {}, model_labels or {}
    percent = lambda r, k="": (f"{r[k + 'rate']:.0%} [{r[k + 'ci_low']:.0%}, {r[k + 'ci_high']:.0%}] "  # noqa: E731
                               f"of {r[k + 'pairs']} pairs")
    whose = lambda m: f"the {model_labels[m]}" if m in model_labels else m  # noqa: E731
    out = []
    for optimised, gold in dict.fromkeys((r["optimised"], r["gold"]) for r in rows):
        group = [r for r in rows if (r["optimised"], r["gold"]) == (optimised, gold) and r["rate"] is not None]
        if not group:
            continue
        first, last = group[0], group[-1]
        reward = labels[optimised][:1].upper() + labels[optimised][1:] if optimised in labels else f"The reward ({optimised})"
        text = (f"{reward} picks the same one of two replies to a prompt as "
                f"{labels.get(gold, gold)} in {percent(first)} of replies by {whose(first['model'])}")
        if last is not first:
            text += f", and in {percent(last)} of replies by {whose(last['model'])}"
            has_clear = first.get("clear_rate") is not None and last.get("clear_rate") is not None
            clear_fell = has_clear and last["clear_ci_high"] < first["clear_ci_low"]
            clear_text = (f"the pairs the gold judge separates clearly (a gap above {number(first['clear_min_gap'])}): "
                          f"{percent(first, 'clear_')} and {percent(last, 'clear_')}") if has_clear else ""
            if last["ci_high"] < first["ci_low"] and clear_fell:
                text += (f": less where the policy went, also on {clear_text}. So the policy has found replies the reward "
                         "overrates")
            elif last["ci_high"] < first["ci_low"]:
                # Closeness excuses the fall only when the gold judge's mean gap within a pair did shrink.
                gaps = first.get("mean_gap"), last.get("mean_gap")
                gap_fell = None not in gaps and gaps[1] < gaps[0]
                text += ": less where the policy went"
                if gap_fell:
                    text += (f", but replies by {whose(last['model'])} lie closer together by the gold judge (mean gap "
                             f"{number(gaps[0])} → {number(gaps[1])}), and close pairs are hard to order for any score")
                if clear_text:
                    text += f"{'; ' if gap_fell else ', but '}on {clear_text}, no clear fall"
            elif last["ci_low"] > first["ci_high"]:
                text += ": more where the policy went"
        out.append(text + ".")
    return out
