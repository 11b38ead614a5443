"""The report's training curves as PNG bytes, each with a caption that says what the curve did.

Every plot has its axes labelled with units; the KL plot carries the controller's target (and the
stop ceiling) as lines; the reward plot puts the gold judge on a second axis with its peak marked,
since "the optimised score kept rising while the gold judge fell" is the one pattern a person must
be able to see at a glance. matplotlib is imported inside the functions: it is heavy, and only
report writing needs it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from rlhf.eval.verdict import GoldStory, number

WIDTH_IN, HEIGHT_IN, DPI = 9.0, 4.6, 100  # 900 × 460 pixels: readable at full width, crisp at half


@dataclass
class Plot:
    key: str          # file name stem, e.g. "kl"
    title: str
    png: bytes
    caption: str


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Shown at about 540 px wide beside another plot: type that stays readable after scaling.
    plt.rcParams.update({"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "legend.fontsize": 11})
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    ax.grid(alpha=0.3)
    ax.set_xlabel("PPO step")
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _marker(n: int) -> str | None:
    return "o" if n < 30 else None


def reward_and_gold(rows: list[dict], story: GoldStory | None, reward_units: str, gold_label: str) -> Plot | None:
    xs, ys = _series(rows, "score_mean")
    if len(xs) < 2:
        return None
    plt, fig, ax = _figure()
    ax.plot(xs, ys, color="tab:blue", marker=_marker(len(xs)), linewidth=1.5, label="optimised reward")
    ax.set_ylabel(f"optimised reward ({reward_units})", color="tab:blue")
    caption = f"The optimised reward went from {number(ys[0])} at step {xs[0]} to {number(ys[-1])} at step {xs[-1]}."
    gx, gy = _series(rows, "gold_mean")
    handles = ax.get_lines()
    if len(gx) >= 2:
        g = ax.twinx()
        handles += g.plot(gx, gy, color="tab:orange", marker="s", linewidth=1.5, label=gold_label)
        g.set_ylabel("gold judge score (its own units)", color="tab:orange")
        if story is not None:
            handles += g.plot([story.peak_step], [story.peak], marker="*", markersize=18, color="tab:red", linestyle="none",
                              label=f"gold peak, step {story.peak_step}")
            caption += (f" The {gold_label} (orange, right axis; the policy never saw it) peaked at step {story.peak_step} "
                        f"(red star, {number(story.peak)}) and ended at {number(story.last)}"
                        + (" while the optimised reward kept rising: over-optimisation." if story.fell_after_peak and story.proxy_kept_rising
                           else "." if story.peak_step != story.last_step else ", its best."))
        ax.legend(handles=handles, loc="upper left")
    ax.set_title("Optimised reward and the held-out gold judge")
    return Plot("reward_gold", "Optimised reward and gold judge", _png(plt, fig), caption)


def kl(rows: list[dict], target: float | None, ceiling: float | None) -> Plot | None:
    xs, ys = _series(rows, "kl")
    if len(xs) < 2:
        return None
    plt, fig, ax = _figure()
    ax.plot(xs, ys, marker=_marker(len(xs)), linewidth=1.5, label="KL of the step's replies")
    caption = f"KL from the reference went from {number(ys[0])} to {number(ys[-1])} nats per reply (peak {number(max(ys))})"
    if target is not None:
        ax.axhline(target, color="tab:green", linestyle="--", label=f"target {number(target)}")
        caption += f"; the adaptive KL penalty steers toward the dashed target of {number(target)}"
    if ceiling is not None and ceiling <= 2 * max(max(ys), target or 0):
        ax.axhline(ceiling, color="tab:red", linestyle=":", label=f"stop ceiling {number(ceiling)}")
        caption += f"; PPO stops above the dotted ceiling of {number(ceiling)}"
    ax.set_ylabel("KL from reference (nats per reply)")
    ax.set_title("How far the policy moved from the reference")
    ax.legend(loc="best")
    return Plot("kl", "KL from reference", _png(plt, fig), caption + ".")


def _line(rows: list[dict], key: str, ylabel: str, title: str):
    """(xs, ys, png) of one metric against the step, or None with fewer than two points."""
    xs, ys = _series(rows, key)
    if len(xs) < 2:
        return None
    plt, fig, ax = _figure()
    ax.plot(xs, ys, marker=_marker(len(xs)), linewidth=1.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return xs, ys, _png(plt, fig)


def beta(rows: list[dict]) -> Plot | None:
    drawn = _line(rows, "beta", "β (reward units per nat of KL)", "KL penalty coefficient β")
    if drawn is None:
        return None
    _, ys, png = drawn
    trend = "rose" if ys[-1] > ys[0] else "fell" if ys[-1] < ys[0] else "stayed"
    why = (" because KL ran above the target" if trend == "rose" else " because KL stayed below the target"
           if trend == "fell" else "")
    return Plot("beta", "KL penalty β", png,
                f"β {trend} from {number(ys[0])} to {number(ys[-1])}{why}; a larger β holds the policy closer to the reference.")


def reply_length(rows: list[dict]) -> Plot | None:
    drawn = _line(rows, "response_length", "reply length (tokens, mean)", "Reply length during PPO")
    if drawn is None:
        return None
    _, ys, png = drawn
    ratio = ys[-1] / ys[0] if ys[0] else float("nan")
    return Plot("response_length", "Reply length", png,
                f"Replies went from {number(ys[0])} to {number(ys[-1])} tokens on average (×{ratio:.2f}); length is a drift "
                "signal: a reward model that likes long or short replies shows here first.")


def training_plots(rows: list[dict], story: GoldStory | None, target_kl: float | None, kl_ceiling: float | None,
                   reward_units: str = "reward units", gold_label: str = "gold judge") -> list[Plot]:
    plots = [reward_and_gold(rows, story, reward_units, gold_label), kl(rows, target_kl, kl_ceiling), beta(rows),
             reply_length(rows)]
    return [p for p in plots if p is not None]
