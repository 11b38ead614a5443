"""A knowledge base no pretrained model can know: consistent facts about invented people, towns and firms.

Names are made from syllables with a seeded RNG (``Drelin``, ``Okta``), so the facts exist nowhere
but here. The world is small and consistent:

    person   "Zorvik lives in Plimsa. Zorvik works at Brindel."     (one document each)
    town     "Plimsa is on the river Okta."
    company  "Brindel is a company based in Quenta."

Questions come in two kinds. Single-hop questions need one fact ("Where does Zorvik live?");
two-hop questions need a fact about the answer of another ("Which river is the town of Zorvik
on?": Zorvik → Plimsa → Okta), so the passage that answers them is found only by searching for
the bridge entity, which the question does not name. That is where plain RAG (one retrieval with
the question) falls short and a ReAct agent (search, read, search again) does not.

People are split three ways, and every question about a person belongs to that person's split:

* ``sft``  — worked examples for supervised fine-tuning: ReAct traces, RAG examples (passages →
  answer) and closed-book examples (question → answer); town and firm questions are here too;
* ``rl``   — training questions for RL over episodes, never shown in SFT (so RL cannot lean on
  answers memorised during SFT);
* ``held_out`` — evaluation only; nothing about these people appears in any training target.

The ``split`` field of a question is ``train`` (``sft`` and ``rl``) or ``held_out``; ``stage`` says
which training stage uses a training question.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.agents.episode import Episode, write_episodes
from rlhf.agents.protocol import observation
from rlhf.agents.runner import agent_prompt
from rlhf.agents.tools import ToolRegistry
from rlhf.retrieval.rag import rag_prompt
from rlhf.utils.io import atomic_write_text

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pl", "st", "tr", "sk"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "", "", "n", "r", "l", "k", "s", "m"]

KB_DIR = Path(__file__).resolve().parent.parent / "assets" / "agent"
# The bundled model sees 256 tokens: a two-hop episode with one passage per search and the search
# tool alone in the prompt takes about 220 of them with this tokenizer. Larger models can take more.
KB_TOOLS = ("search",)
KB_SEARCH_K = 1
KB_RAG_K = 3

# Question templates: (kind, hops, template, relation path)
PERSON_QUESTIONS = {
    "lives": (1, "Where does {p} live?"),
    "works": (1, "Where does {p} work?"),
    "river": (2, "Which river is the town of {p} on?"),
    "base": (2, "Where is the company of {p} based?"),
}
TOWN_QUESTION = "Which river is {t} on?"
COMPANY_QUESTION = "Where is {c} based?"


@dataclass
class World:
    people: dict[str, dict] = field(default_factory=dict)     # name -> {"town", "company", "split", "doc"}
    towns: dict[str, dict] = field(default_factory=dict)      # name -> {"river", "doc"}
    companies: dict[str, dict] = field(default_factory=dict)  # name -> {"base", "doc"}


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        syllables = rng.choice([2, 2, 2, 3])
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()
        if 4 <= len(name) <= 8 and name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_world(seed: int = 0, people: int = 320, towns: int = 40, companies: int = 40,
               split_sizes: tuple[int, int] = (80, 60)) -> World:
    """The invented world. ``split_sizes`` = (rl, held_out) people; the rest are ``sft``."""
    rng = random.Random(seed)
    taken: set[str] = set()
    w = World()
    town_names, rivers = _names(rng, towns, taken), _names(rng, towns, taken)
    for i, (t, r) in enumerate(zip(town_names, rivers)):
        w.towns[t] = {"river": r, "doc": f"t{i:02d}"}
    for i, c in enumerate(_names(rng, companies, taken)):
        w.companies[c] = {"base": rng.choice(town_names), "doc": f"c{i:02d}"}
    n_rl, n_held = split_sizes
    company_names = list(w.companies)
    for i, p in enumerate(_names(rng, people, taken)):
        split = "held_out" if i < n_held else "rl" if i < n_held + n_rl else "sft"
        w.people[p] = {"town": rng.choice(town_names), "company": rng.choice(company_names), "split": split, "doc": f"p{i:03d}"}
    return w


def documents(w: World) -> list[dict]:
    docs = [{"id": v["doc"], "text": f"{p} lives in {v['town']}. {p} works at {v['company']}."} for p, v in w.people.items()]
    docs += [{"id": v["doc"], "text": f"{t} is on the river {v['river']}."} for t, v in w.towns.items()]
    docs += [{"id": v["doc"], "text": f"{c} is a company based in {v['base']}."} for c, v in w.companies.items()]
    return docs


def questions(w: World) -> list[dict]:
    """Every question with its answer, hops, the chain of entities and the documents that support it."""
    out = []
    for p, v in w.people.items():
        town, company = v["town"], v["company"]
        facts = {
            "lives": (town, [p], [v["doc"]]),
            "works": (company, [p], [v["doc"]]),
            "river": (w.towns[town]["river"], [p, town], [v["doc"], w.towns[town]["doc"]]),
            "base": (w.companies[company]["base"], [p, company], [v["doc"], w.companies[company]["doc"]]),
        }
        for kind, (hops, template) in PERSON_QUESTIONS.items():
            answer, chain, support = facts[kind]
            out.append({"id": f"{v['doc']}-{kind}", "question": template.format(p=p), "answer": answer, "hops": hops,
                        "kind": kind, "chain": chain, "supporting": support,
                        "split": "held_out" if v["split"] == "held_out" else "train", "stage": v["split"]})
    for t, v in w.towns.items():
        out.append({"id": f"{v['doc']}-river", "question": TOWN_QUESTION.format(t=t), "answer": v["river"], "hops": 1,
                    "kind": "town_river", "chain": [t], "supporting": [v["doc"]], "split": "train", "stage": "sft"})
    for c, v in w.companies.items():
        out.append({"id": f"{v['doc']}-base", "question": COMPANY_QUESTION.format(c=c), "answer": v["base"], "hops": 1,
                    "kind": "company_base", "chain": [c], "supporting": [v["doc"]], "split": "train", "stage": "sft"})
    return out


# --- worked examples for SFT -------------------------------------------------------------------

def _fact_sentence(w: World, entity: str, kind: str) -> str:
    """The sentence of ``entity``'s document the agent needs (what its thought restates)."""
    if entity in w.people:
        v = w.people[entity]
        return f"{entity} works at {v['company']}." if kind in ("works", "base") else f"{entity} lives in {v['town']}."
    if entity in w.towns:
        return f"{entity} is on the river {w.towns[entity]['river']}."
    return f"{entity} is a company based in {w.companies[entity]['base']}."


def react_trace(q: dict, w: World, tools: ToolRegistry, observations: dict[str, str]) -> Episode:
    """The ideal ReAct episode for a question: search each entity of the chain, restate the fact
    found, search the next, answer. ``observations`` maps each search query to what the search
    tool really returns for it."""
    chain = q["chain"]
    goal = {"lives": "the town of", "works": "the company of", "river": "the town of", "base": "the company of",
            "town_river": "the river of", "company_base": "the town of"}[q["kind"]]
    msgs = [{"role": "user", "content": agent_prompt(q["question"], tools)}]
    thought = f"I need {goal} {chain[0]}."
    for entity in chain:
        msgs.append({"role": "assistant", "content": f"Thought: {thought}\nAction: search[{entity}]"})
        msgs.append({"role": "tool", "content": observation(observations[entity])})
        thought = _fact_sentence(w, entity, q["kind"])
    msgs.append({"role": "assistant", "content": f"Thought: {thought}\nAnswer: {q['answer']}"})
    return Episode(f"trace-{q['id']}", q["question"], msgs, answer=q["answer"], final_answer=q["answer"],
                   stop_reason="answer", tool_calls=len(chain), meta={"hops": q["hops"], "kind": "react"})


def closed_book_prompt(question: str) -> str:
    return f"Question: {question}"


def sft_examples(qs: list[dict], w: World, tools: ToolRegistry, index, rag_k: int = KB_RAG_K, rag_mode: str = "hybrid") -> list[Episode]:
    """For every ``sft``-stage question: a ReAct trace, a RAG example (the question's top passages →
    the answer) and a closed-book example (question → answer), so that all three ways of answering
    are measured with a model that knows their format."""
    chosen = [q for q in qs if q["stage"] == "sft"]
    hits = index.search_many([q["question"] for q in chosen], rag_k, rag_mode)
    entities = sorted({e for q in chosen for e in q["chain"]})
    if index.embeddings is not None:
        index.encoder().embed_queries(entities)  # one batched encoder pass; the searches below hit its cache
    observations = {e: tools.call("search", e).text for e in entities}
    out = []
    for q, h in zip(chosen, hits):
        out.append(react_trace(q, w, tools, observations))
        answer = [{"role": "assistant", "content": f"Answer: {q['answer']}"}]
        out.append(Episode(f"rag-{q['id']}", q["question"], [{"role": "user", "content": rag_prompt(q["question"], h)}] + answer,
                           answer=q["answer"], meta={"hops": q["hops"], "kind": "rag"}))
        out.append(Episode(f"closed-{q['id']}", q["question"], [{"role": "user", "content": closed_book_prompt(q["question"])}] + answer,
                           answer=q["answer"], meta={"hops": q["hops"], "kind": "closed_book"}))
    return out


def world_names(w: World) -> set[str]:
    """Every invented name in the world: people, towns, rivers and companies."""
    return set(w.people) | set(w.towns) | {v["river"] for v in w.towns.values()} | set(w.companies)


def renamed_copies(episodes: list[Episode], copies: int, seed: int = 0, world_seed: int = 0) -> list[Episode]:
    """``copies`` versions of each ReAct and RAG worked example in which every invented name is
    replaced by a fresh one, consistently within the example (question, thoughts, actions,
    observations, passages and answer agree), and never by a name of the shipped world.

    Why: in the shipped examples each SFT person's facts appear three ways and three epochs over, so
    a small model lowers its loss fastest by memorising which town goes with which name, and then
    answers a held-out person with a memorised name instead of the one in the observation it just
    read. In a renamed copy the answer is nowhere but in the text it read, so copying is the only
    way to fit it. Examples whose answer is not in what the model reads are left out: closed-book
    ones, and two-hop RAG ones whose second passage was not retrieved; renamed, their answers could
    only be guessed."""
    known = world_names(make_world(world_seed))
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(known, key=len, reverse=True)) + r")\b")
    eligible = []  # (example, the names it mentions in order of first appearance)
    for ep in episodes:
        read = " ".join(m["content"] for m in ep.messages if m["role"] != "assistant")
        if ep.meta.get("kind") == "closed_book" or not ep.answer or not re.search(rf"\b{re.escape(ep.answer)}\b", read):
            continue
        texts = [ep.question, ep.answer, ep.final_answer or ""] + [m["content"] for m in ep.messages]
        eligible.append((ep, list(dict.fromkeys(n for t in texts for n in pattern.findall(t)))))
    rng = random.Random(seed)
    out = []
    for copy in range(copies):
        for ep, found in eligible:
            mapping = dict(zip(found, _names(rng, len(found), set(known))))

            def sub(text: str | None, mapping: dict = mapping) -> str | None:
                return None if text is None else pattern.sub(lambda m: mapping[m.group(0)], text)

            out.append(Episode(f"{ep.id}~renamed{copy}", sub(ep.question), [{**m, "content": sub(m["content"])} for m in ep.messages],
                               answer=sub(ep.answer), final_answer=sub(ep.final_answer), stop_reason=ep.stop_reason,
                               tool_calls=ep.tool_calls, invalid_calls=ep.invalid_calls, meta={**ep.meta, "renamed": True}))
    return out


def write_kb(out_dir: str | Path, seed: int = 0, index_dir: str | Path | None = None) -> dict:
    """Write kb.jsonl (documents), questions.jsonl, the KB's index (``index_dir``, default
    ``out_dir/index``) and sft.jsonl (worked examples whose observations come from that index)."""
    from rlhf.agents.tools import make_registry
    from rlhf.retrieval.documents import read_documents
    from rlhf.retrieval.index import Index

    out = Path(out_dir)
    w = make_world(seed)
    docs, qs = documents(w), questions(w)
    atomic_write_text(out / "kb.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    atomic_write_text(out / "questions.jsonl", "".join(json.dumps(q) + "\n" for q in qs))
    index = Index.build(read_documents(out / "kb.jsonl")[0])
    index.save(index_dir or out / "index")
    examples = sft_examples(qs, w, make_registry(KB_TOOLS, index, KB_SEARCH_K), index)
    write_episodes(out / "sft.jsonl", examples)
    return {"documents": len(docs), "questions": len(qs), "sft_examples": len(examples),
            "by_stage": {s: sum(1 for q in qs if q["stage"] == s) for s in ("sft", "rl", "held_out")}}
