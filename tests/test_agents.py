"""ReAct agents: the protocol (malformed actions included), tools, episode records and their loss
mask, the shipped knowledge base, and SFT on episodes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlhf.agents.episode import ChatRenderer, Episode, encode_for_training, read_episodes, write_episodes
from rlhf.agents.kb import documents, make_world, questions, renamed_copies, sft_examples
from rlhf.agents.protocol import decode_arguments, parse_turn
from rlhf.agents.rewards import EpisodeReward, RewardConfig, exact_match, f1_score, normalize_answer
from rlhf.agents.runner import AgentConfig, EpisodeRunner, Task, read_tasks
from rlhf.agents.tools import ToolInputError, ToolRegistry, calculate, calculator_tool, make_registry, tool_from_function
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError, DataError
from rlhf.retrieval.documents import Document
from rlhf.retrieval.index import Index

TOOLS = ["search", "calc"]


# --- protocol ----------------------------------------------------------------------------------

def test_a_well_formed_action_and_answer_are_read():
    p = parse_turn("Thought: I need Zorvik's town.\nAction: search[Zorvik]", TOOLS)
    assert (p.thought, p.tool, p.tool_input, p.error) == ("I need Zorvik's town.", "search", "Zorvik", None)
    assert p.is_action and not p.is_answer
    p = parse_turn("Thought: found it.\nAnswer: Plimsa\nmore text", TOOLS)
    assert p.is_answer and p.answer == "Plimsa"
    assert parse_turn("Action: finish[Okta]", TOOLS).answer == "Okta"  # ReAct's finish[] is an answer
    assert parse_turn("Action: calc[(2 + 3) * [4]]", TOOLS).tool_input == "(2 + 3) * [4]"  # brackets inside the input
    assert parse_turn("action:   SEARCH[ Zorvik ]", TOOLS).tool == "search"  # case and spaces are forgiven
    p = parse_turn("Action: search[a]\nObservation: made up", TOOLS)
    assert p.tool_input == "a" and p.trailing == "Observation: made up"


@pytest.mark.parametrize("text,fragment", [
    ("I think it is Plimsa.", "no action found"),
    ("", "no action found"),
    ("Action: search Zorvik", "put the input in brackets"),
    ("Action: search[Zorvik", "must end with ']'"),
    ("Action: serch[Zorvik]", "unknown tool 'serch'; the tools are: search, calc"),
    ("Action: search[  ]", "search[] is empty"),
    ("Action:", "the action is empty"),
    ("Action: 9x[Zorvik]", "write it as <tool>[<input>]"),
    ("Answer:   ", "the answer is empty"),
    ("Action: finish[]", "finish[] is empty"),
])
def test_malformed_turns_say_what_was_wrong(text, fragment):
    p = parse_turn(text, TOOLS)
    assert p.error is not None and fragment in p.error
    assert not p.is_action and not p.is_answer


def test_arguments_follow_the_tool_schema():
    one = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    assert decode_arguments("42", one) == {"x": 42}
    assert decode_arguments('{"x": 7}', one) == {"x": 7}
    with pytest.raises(ValueError, match="must be an integer"):
        decode_arguments("4.5", one)
    two = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}
    assert decode_arguments("Oslo", two) == {"city": "Oslo"}  # plain text fills the one required parameter
    assert decode_arguments('{"city": "Oslo", "days": 3}', two) == {"city": "Oslo", "days": 3}
    with pytest.raises(ValueError, match="unknown argument"):
        decode_arguments('{"city": "Oslo", "hours": 3}', two)
    with pytest.raises(ValueError, match="missing argument"):
        decode_arguments('{"days": 3}', two)


# --- tools -------------------------------------------------------------------------------------

def test_calculator_computes_arithmetic_and_nothing_else():
    assert calculate("3 * (4 + 5)") == "27"
    assert calculate("7 / 2") == "3.5"
    assert calculate("2 ** 10 - sqrt(16)") == "1020"
    assert calculate("round(pi, 2)") == "3.14"
    for bad, fragment in [("__import__('os').system('true')", "only numbers"), ("open('x')", "only numbers"),
                          ("(1).__class__", "only numbers"), ("9 ** 9 ** 9", "exponent too large"), ("1 / 0", "division by zero"),
                          ("2 ^ 3", r"write \*\*"), ("x + 1", "only numbers"), ("1 +", "cannot read")]:
        with pytest.raises(ToolInputError, match=fragment):
            calculate(bad)


def test_user_functions_become_tools_with_a_schema_and_never_raise():
    def convert(value: float, unit: str = "km") -> str:
        """Convert a distance to miles."""
        if unit != "km":
            raise ValueError(f"cannot convert {unit}")
        return f"{value * 0.621:.2f} miles"

    tool = tool_from_function(convert)
    assert tool.description == "Convert a distance to miles."
    assert tool.parameters == {"type": "object", "properties": {"value": {"type": "number"}, "unit": {"type": "string"}},
                               "required": ["value"]}
    assert tool.call("10").text == "6.21 miles"
    bad = tool.call('{"value": 10, "unit": "ft"}')
    assert bad.error == "convert failed: ValueError: cannot convert ft"
    assert "must be a number" in tool.call("ten").error
    reg = ToolRegistry()
    reg.register(tool)
    reg.register(calculator_tool())
    assert reg.describe() == "Tools: convert[value, unit], calc[expression]"
    assert "unknown tool" in reg.call("nope", "x").error
    with pytest.raises(ConfigError, match="two tools"):
        reg.register(calculator_tool())
    with pytest.raises(ConfigError, match="search tool needs an index"):
        make_registry(["search"])

    def untyped(*args):
        return ""

    with pytest.raises(ConfigError, match=r"\*args"):
        tool_from_function(untyped)


# --- episodes ----------------------------------------------------------------------------------

TRACE = [{"role": "user", "content": "Tools: search[query]\nQuestion: Where does Zorvik live?"},
         {"role": "assistant", "content": "Thought: find Zorvik.\nAction: search[Zorvik]"},
         {"role": "tool", "content": "Observation: [p1#0] Zorvik lives in Plimsa."},
         {"role": "assistant", "content": "Answer: Plimsa"}]


def test_rendered_episode_marks_exactly_the_model_turns(tiny_tokenizer):
    r = ChatRenderer(tiny_tokenizer)
    ep = Episode("e1", "Where does Zorvik live?", TRACE, answer="Plimsa")
    segments = r.render(ep)
    assert [s.author for s in segments] == ["prompt", "model", "env", "model"]
    eos = tiny_tokenizer.eos_token
    assert segments[1].text == TRACE[1]["content"] + eos and segments[3].text == "Answer: Plimsa" + eos
    assert "Observation: [p1#0] Zorvik lives in Plimsa." in segments[2].text
    full = "".join(s.text for s in segments)
    template = tiny_tokenizer.apply_chat_template([{**m, "role": r.observation_role} if m["role"] == "tool" else m
                                                   for m in TRACE], tokenize=False)
    assert template == full + "\n"  # the template's own rendering (its newline after the last turn is never fed)
    ep.segments = segments
    ids, mask = ep.ids_and_mask()
    model_ids = [t for t, m in zip(ids, mask) if m]
    assert model_ids == segments[1].ids + segments[3].ids
    assert tiny_tokenizer.decode(model_ids, skip_special_tokens=True) == TRACE[1]["content"] + "Answer: Plimsa"
    enc_ids, labels = encode_for_training(ep, r, max_length=512)
    assert enc_ids == ids and [lab != -100 for lab in labels] == [bool(m) for m in mask]
    assert encode_for_training(ep, r, max_length=len(ids) - 1) is None  # too long: left out, never cut


def test_episode_records_round_trip_and_bad_records_name_the_line(tmp_path, tiny_tokenizer):
    ep = Episode("e1", "q", TRACE, answer="Plimsa", final_answer="Plimsa", stop_reason="answer", tool_calls=1)
    ep.segments = ChatRenderer(tiny_tokenizer).render(ep)
    write_episodes(tmp_path / "e.jsonl", [ep])
    back = read_episodes(tmp_path / "e.jsonl")[0]
    assert back.to_json() == ep.to_json() and back.ids_and_mask() == ep.ids_and_mask()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": TRACE}) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'messages'"):
        read_episodes(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"messages": TRACE[:1]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        read_episodes(tmp_path / "bad2.jsonl")


class Scripted(EpisodeRunner):
    """The runner with the policy replaced by scripted replies (task id → one reply per turn)."""

    def __init__(self, tokenizer, tools, cfg, replies: dict[str, list[str]]):
        model = torch.nn.Linear(1, 1)
        model.config = type("C", (), {"max_position_embeddings": 512})()
        super().__init__(model, tokenizer, tools, cfg)
        self.replies = replies

    def _sample(self, chunk, seeds):
        out = []
        for s in chunk:
            turn = sum(1 for m in s.episode.messages if m["role"] == "assistant")
            out.append(self.tok(self.replies[s.episode.id][turn], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        return out


def test_malformed_actions_become_observations_and_the_episode_goes_on(tiny_tokenizer):
    reg = ToolRegistry()
    reg.register(calculator_tool())
    replies = {"a": ["Action: calc 2+2", "Action: calc[2+]", "Action: calc[2+2]", "Answer: 4"],
               "b": ["no idea", "Action: weather[Oslo]", "Action: calc[1/0]", "Action: calc[1+1]"],
               "c": ["Action: calc[6*7]\nObservation: 41", "Answer: 42"]}
    cfg = AgentConfig(max_turns=4)
    eps = Scripted(tiny_tokenizer, reg, cfg, replies).run([Task("a", "2+2?", "4"), Task("b", "?", "x"), Task("c", "6*7?", "42")])
    a, b, c = eps
    obs = [m["content"] for m in a.messages if m["role"] == "tool"]
    assert "put the input in brackets" in obs[0] and "cannot read '2+'" in obs[1] and obs[2] == "Observation: 4"
    assert (a.final_answer, a.stop_reason, a.tool_calls, a.invalid_calls, a.turns) == ("4", "answer", 3, 2, 4)
    obs = [m["content"] for m in b.messages if m["role"] == "tool"]
    assert "no action found" in obs[0] and "unknown tool 'weather'" in obs[1] and "division by zero" in obs[2]
    assert obs[3] == "Observation: 2"  # the last turn's action still runs and is recorded
    assert (b.final_answer, b.stop_reason, b.invalid_calls) == (None, "max_turns", 3)
    # The model's own "Observation:" is a stop sequence: cut there, the real observation follows.
    assert c.messages[1]["content"].strip() == "Action: calc[6*7]" and c.messages[2]["content"] == "Observation: 42"
    assert all(s.text.count("Observation: 41") == 0 for s in c.segments)
    _, mask = c.ids_and_mask()
    assert c.segments[1].author == "model" and not c.segments[1].text.endswith(tiny_tokenizer.eos_token)
    assert sum(mask) == sum(len(s.ids) for s in c.segments if s.author == "model")


def test_tasks_file_errors_name_the_line(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "1", "question": "q", "answer": ["a", "b"], "hops": 2}) + "\n"
                                      + json.dumps({"question": "q2", "answer": 3}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'answer'"):
        read_tasks(tmp_path / "t.jsonl")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"id": "1", "question": "q", "answer": ["a", "b"], "hops": 2}) + "\n")
    (task,) = read_tasks(tmp_path / "ok.jsonl")
    assert task.answer == ["a", "b"] and task.meta == {"hops": 2}


# --- rewards -----------------------------------------------------------------------------------

def test_exact_match_and_f1_use_squad_normalisation():
    assert normalize_answer("The  Okta!") == "okta"
    assert exact_match("the okta.", ["Okta"]) == 1.0 and exact_match("Okta river", ["Okta"]) == 0.0
    assert exact_match(None, ["Okta"]) == 0.0
    assert f1_score("Okta river", ["Okta"]) == pytest.approx(2 / 3)
    eps = [Episode("a", "q", TRACE, answer="Plimsa", final_answer="plimsa", invalid_calls=1),
           Episode("b", "q", TRACE, answer="Plimsa", final_answer=None)]
    r = EpisodeReward(RewardConfig("exact_match", format_bonus=0.1, tool_error_penalty=0.2))(eps)
    assert r.tolist() == pytest.approx([1.0 + 0.1 - 0.2, 0.0])
    assert eps[0].reward == pytest.approx(0.9)
    with pytest.raises(ConfigError):
        EpisodeReward(RewardConfig("bleu"))


# --- the knowledge base ------------------------------------------------------------------------

def test_the_knowledge_base_is_consistent_and_its_splits_do_not_leak():
    w = make_world(seed=3, people=60, towns=8, companies=8, split_sizes=(10, 12))
    docs = {d["id"]: d["text"] for d in documents(w)}
    qs = questions(w)
    assert len(qs) == 60 * 4 + 8 + 8
    for q in qs:  # every answer is stated by the question's supporting documents, hop by hop
        support = " ".join(docs[d] for d in q["supporting"])
        assert q["answer"] in support and q["chain"][0] in q["question"]
        assert len(q["supporting"]) == q["hops"]
        if q["hops"] == 2:
            assert q["chain"][1] not in q["question"]  # the bridge entity must be found, not read
    held = [p for p, v in w.people.items() if v["split"] == "held_out"]
    assert len(held) == 12 and {q["stage"] for q in qs if q["split"] == "held_out"} == {"held_out"}
    index = Index.build([Document(i, t, "kb") for i, t in docs.items()], dense=False)
    reg = make_registry(["search"], index, k=1, mode="bm25")
    examples = sft_examples(qs, w, reg, index, rag_mode="bm25")
    targets = " ".join(m["content"] for e in examples for m in e.messages if m["role"] == "assistant")
    for p in held:
        assert p not in targets  # nothing about a held-out person is ever a training target
    rl_people = [p for p, v in w.people.items() if v["split"] == "rl"]
    assert not any(p in targets for p in rl_people)  # nor about the people RL trains on
    trace = next(e for e in examples if e.id.startswith("trace-") and e.meta["hops"] == 2)
    acts = [m["content"] for m in trace.messages if m["role"] == "assistant"]
    q = next(q for q in qs if f"trace-{q['id']}" == trace.id)
    assert acts[0].endswith(f"search[{q['chain'][0]}]") and acts[1].endswith(f"search[{q['chain'][1]}]")
    assert acts[2].endswith(f"Answer: {q['answer']}")


def test_shipped_knowledge_base_files_match_the_generator():
    from rlhf.agents.kb import KB_DIR

    if not (KB_DIR / "kb.jsonl").is_file():
        pytest.fail(f"the shipped knowledge base is missing from {KB_DIR}; make it with `rlhf agent kb --out {KB_DIR}`")
    w = make_world()
    shipped = [json.loads(line) for line in (KB_DIR / "kb.jsonl").read_text().splitlines()]
    assert shipped == documents(w)
    shipped_q = [json.loads(line) for line in (KB_DIR / "questions.jsonl").read_text().splitlines()]
    assert shipped_q == questions(w)
    examples = read_episodes(KB_DIR / "sft.jsonl")
    assert {e.meta["kind"] for e in examples} == {"react", "rag", "closed_book"}


def test_renamed_copies_replace_every_name_consistently_and_never_with_a_real_one():
    from rlhf.agents.kb import world_names

    w = make_world(seed=3, people=60, towns=8, companies=8, split_sizes=(10, 12))
    docs = {d["id"]: d["text"] for d in documents(w)}
    qs = questions(w)
    index = Index.build([Document(i, t, "kb") for i, t in docs.items()], dense=False)
    examples = sft_examples(qs, w, make_registry(["search"], index, k=1, mode="bm25"), index, rag_mode="bm25")
    copies = renamed_copies(examples, copies=2, seed=5, world_seed=3)
    answerable = [e for e in examples if e.meta["kind"] != "closed_book"
                  and e.answer in " ".join(m["content"] for m in e.messages if m["role"] != "assistant")]
    assert len(copies) == 2 * len(answerable) and {e.meta["kind"] for e in answerable} == {"react", "rag"}
    known = world_names(w)
    by_id = {e.id: e for e in examples}
    for c in copies:
        original = by_id[c.id.split("~")[0]]
        text = " ".join([c.question] + [m["content"] for m in c.messages])
        assert not any(re.search(rf"\b{n}\b", text) for n in known)  # no fact about a real entity is taught
        assert c.answer != original.answer and c.answer in " ".join(m["content"] for m in c.messages if m["role"] != "assistant")
        # the same structure, names aside: the tool calls, observation ids and turns are unchanged
        assert [m["role"] for m in c.messages] == [m["role"] for m in original.messages]
        assert re.findall(r"\[[pct]\d+#\d\]", text) == re.findall(r"\[[pct]\d+#\d\]", " ".join(m["content"] for m in original.messages))
    trace = next(c for c in copies if c.meta["kind"] == "react" and c.meta["hops"] == 2)
    searched = re.findall(r"search\[(\w+)\]", " ".join(m["content"] for m in trace.messages if m["role"] == "assistant"))
    assert searched[0] in trace.question and searched[1] in trace.messages[2]["content"]  # the bridge is read, then searched
    assert renamed_copies(examples, copies=2, seed=5, world_seed=3)[0].to_json() == copies[0].to_json()  # seeded


# --- SFT on episodes ---------------------------------------------------------------------------

def test_rlhf_sft_reads_episode_files_with_loss_on_model_turns(tmp_path, tiny_model_dir, tiny_tokenizer):
    from rlhf.train.sft import SFTConfig, load_sft_data, run_sft

    eps = [Episode(f"e{i}", "q", TRACE, answer="Plimsa") for i in range(8)]
    write_episodes(tmp_path / "traces.jsonl", eps)
    cfg = SFTConfig(data=str(tmp_path / "traces.jsonl"), out=str(tmp_path / "sft"), model=str(tiny_model_dir), batch_size=4,
                    max_steps=2, save_every=0, engine=EngineConfig(device="cpu", threads=1))
    encoded = load_sft_data(cfg.data, tiny_tokenizer, cfg)
    ids, labels = encoded[0]
    learned = tiny_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True)
    assert learned == TRACE[1]["content"] + "Answer: Plimsa"  # the observation and the prompt get no loss
    summary = run_sft(cfg)
    assert summary["steps"] == 2 and Path(summary["model"], "config.json").is_file()
