"""The supervised half of constitutional AI: critique and revise, then fine-tune on the revisions.

For each prompt the model samples a reply; then, for ``rounds`` rounds, a principle drawn at random
asks it to critique its current reply and then to revise it (Bai et al. 2022, §3). The worked
examples of the constitution come first in every request (few-shot). Every step is kept in
``chains.jsonl`` (prompt, first reply, each round's principle, critique and revision) and the
final revisions in ``sft.jsonl``, the SFT contract, so ``rlhf sft --data OUT/sft.jsonl`` gives the
SL-CAI model. Generation runs in batches; a killed run keeps what it finished and resumes there.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rlhf.cai import prompts as P
from rlhf.cai.constitution import Constitution
from rlhf.data.io import iter_jsonl, read_records, write_records
from rlhf.data.records import PromptRecord
from rlhf.utils.io import atomic_write_text

CRITIQUE_PREFIX = "Critique:"
REVISION_PREFIX = "Revision:"


@dataclass
class Chain:
    prompt_id: str
    prompt: str
    initial: str
    steps: list[dict]

    @property
    def final(self) -> str:
        return self.steps[-1]["revision"] if self.steps else self.initial

    def to_json(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "initial": self.initial, "steps": self.steps,
                "final": self.final}


def _clean(text: str, prefix: str) -> str:
    """The model's answer without a repeated label and without anything it wrote for the next turn."""
    text = text.strip()
    if text.startswith(prefix):
        text = text[len(prefix):].strip()
    for marker in ("Critique request:", "Revision request:", "Critique:", "Revision:"):
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut].strip()
    return text


def revise_prompts(model, constitution: Constitution, prompts: list[PromptRecord], *, rounds: int = 1,
                   examples: int = 2, max_new_tokens: int = 96, temperature: float = 0.7, seed: int = 0,
                   batch: int = 8, done: dict[str, Chain] | None = None, on_batch=None, progress: bool = True) -> list[Chain]:
    """Critique-revision chains for every prompt (those in ``done`` are kept as they are)."""
    shots = P.examples_for(constitution, "critique", examples)
    done = dict(done or {})
    chains = []
    bar = tqdm(total=len(prompts), desc="critique and revise", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch):
        todo = [p for p in prompts[start:start + batch] if p.id not in done]
        if todo:
            step_seed = seed * 1_000_003 + start
            replies = model.generate([model.format([{"role": "user", "content": p.prompt}]) for p in todo],
                                     max_new_tokens, temperature, step_seed)
            current = {p.id: Chain(p.id, p.prompt, r, []) for p, r in zip(todo, replies)}
            for rnd in range(rounds):
                principles = [random.Random(f"{seed}:{p.id}:{rnd}").choice(constitution.principles) for p in todo]
                chains_now = [current[p.id] for p in todo]
                critiques = model.generate(
                    [model.format(P.critique_messages(c.prompt, c.final, pr, shots), CRITIQUE_PREFIX)
                     for c, pr in zip(chains_now, principles)], max_new_tokens, temperature, step_seed + 1 + 2 * rnd)
                critiques = [_clean(t, CRITIQUE_PREFIX) for t in critiques]
                revisions = model.generate(
                    [model.format(P.revision_messages(c.prompt, c.final, cr, pr, shots), REVISION_PREFIX)
                     for c, cr, pr in zip(chains_now, critiques, principles)], max_new_tokens, temperature,
                    step_seed + 2 + 2 * rnd)
                for c, pr, cr, rv in zip(chains_now, principles, critiques, revisions):
                    rv = _clean(rv, REVISION_PREFIX)
                    # An empty revision would train the model to say nothing: keep the reply it revises.
                    c.steps.append({"round": rnd + 1, "principle": pr.id, "critique": cr,
                                    "revision": rv or c.final, "revision_empty": not rv})
            done.update(current)
            if on_batch is not None:
                on_batch(done)
        chains += [done[p.id] for p in prompts[start:start + batch]]
        bar.update(len(prompts[start:start + batch]))
    bar.close()
    return chains


def read_done(path: Path) -> dict[str, Chain]:
    """Chains a previous (killed) run finished, to resume from."""
    if not path.is_file():
        return {}
    out = {}
    for _, obj in iter_jsonl(path):
        out[str(obj["prompt_id"])] = Chain(str(obj["prompt_id"]), obj["prompt"], obj["initial"], obj["steps"])
    return out


def run_revise(model, constitution: Constitution, prompts_file: str, out: str | Path, **kwargs) -> dict:
    """Write OUT/chains.jsonl (every step) and OUT/sft.jsonl (prompt, final revision); returns a summary."""
    out = Path(out)
    prompts = read_records(prompts_file, PromptRecord)
    chains_path = out / "chains.jsonl"

    def save(done: dict[str, Chain]) -> None:
        ordered = [done[p.id].to_json() for p in prompts if p.id in done]
        write_records(chains_path, ordered)

    chains = revise_prompts(model, constitution, prompts, done=read_done(chains_path), on_batch=save, **kwargs)
    save({c.prompt_id: c for c in chains})
    write_records(out / "sft.jsonl", [{"prompt": c.prompt, "completion": c.final} for c in chains])
    summary = {"prompts": len(chains), "rounds": kwargs.get("rounds", 1), "constitution": constitution.name,
               "model": model.name, "empty_revisions": sum(s.get("revision_empty", False) for c in chains for s in c.steps),
               "changed": sum(c.final != c.initial for c in chains),
               "chains": str(chains_path), "sft": str(out / "sft.jsonl")}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
