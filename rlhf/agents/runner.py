"""Running ReAct episodes: the policy writes a turn, the environment answers, until an answer.

Episodes run in batches, turn by turn: every unfinished episode's tokens so far (left-padded) go to
the decode loop together, each sampled turn is cut at its end-of-turn token or at a stop sequence
(``Observation:`` by default: a model that starts writing its own observation is stopped there, and
the real one follows), parsed by the protocol, and answered by a tool or an error observation. An
episode ends when the agent answers, after ``max_turns`` turns, or when its context is full.

The token ids the policy sampled are kept as they were drawn (never re-tokenized from text), so an
RL update scores exactly the tokens of the episode. Turns are sampled by a rollout backend
(rlhf/rollout/backends.py: the engine's ``--rollout``), each episode's turn from its own random
stream, a function of (seed, episode index, turn): an episode is the same whichever batch or
process ran it, which makes RL over episodes exact to resume and to split over processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.agents.episode import ChatRenderer, Episode, Segment
from rlhf.agents.protocol import error_observation, observation, parse_turn
from rlhf.agents.tools import ToolRegistry
from rlhf.config import opt
from rlhf.data.io import iter_jsonl
from rlhf.errors import DataError
from rlhf.rollout.backends import RolloutBackend, default_backend
from rlhf.rollout.generate import SamplingParams


@dataclass
class AgentConfig:
    """How episodes run: turns, sampling, stop sequences, context."""

    max_turns: int = opt(4, help="Model turns per episode; an episode without an answer by then ends unanswered.")
    max_new_tokens: int = opt(40, help="Longest turn in tokens (a turn also ends at the end-of-turn token or a stop sequence).")
    temperature: float = opt(0.0, help="Sampling temperature per turn; 0 = greedy.")
    top_p: float = opt(1.0, help="Nucleus sampling threshold.")
    top_k: int = opt(0, help="Sample from the k most likely tokens only (0 = off).")
    stop: list[str] = opt(factory=lambda: ["Observation:"], help="Stop sequences: a turn is cut where one starts.")
    observation_chars: int = opt(400, help="Longest observation in characters (longer tool results are cut).")
    max_context: int = opt(0, help="Longest episode in tokens (0 = the model's maximum positions).")
    decode_batch_size: int = opt(32, help="Episodes decoded together.")


@dataclass
class Task:
    id: str
    question: str
    answer: str | list[str] | None = None
    meta: dict = field(default_factory=dict)


def read_tasks(path: str | Path) -> list[Task]:
    """Tasks from JSON Lines: ``question`` (or ``prompt``), optional ``id``, optional ``answer`` (a
    string or a list of accepted strings); other fields are kept in ``meta`` (hops, split, ...)."""
    tasks = []
    for line, obj in iter_jsonl(path):
        key = "question" if "question" in obj else "prompt"
        text = obj.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, line, "missing or empty (a task needs the question's text)", key)
        answer = obj.get("answer")
        if answer is not None and not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                                                     and all(isinstance(a, str) for a in answer))):
            raise DataError(path, line, f"expected a string or a list of strings, got {answer!r}", "answer")
        meta = {k: v for k, v in obj.items() if k not in ("id", "question", "prompt", "answer")}
        tasks.append(Task(str(obj.get("id", f"{Path(str(path)).stem}-{line}")), text, answer, meta))
    if not tasks:
        raise DataError(path, None, "holds no tasks")
    return tasks


def agent_prompt(question: str, tools: ToolRegistry) -> str:
    """The user message of an episode: the tools line, then the question."""
    return f"{tools.describe()}\nQuestion: {question}"


@dataclass
class _Live:
    episode: Episode
    text: str           # the text of all segments so far
    ids: list[int]      # all token ids so far
    index: int = 0      # the episode's index in the run (with the run's seed, its random stream)
    done: bool = False


def turn_seeds(seed: int, indices: list[int], turn: int) -> list[int]:
    """Sampling seeds of episodes ``indices`` at ``turn``: a function of (seed, episode, turn) alone."""
    base = (seed * 1_000_003 + turn) * 100_003
    return [(base + i) % 2**63 for i in indices]


class EpisodeRunner:
    """Runs episodes of ``model`` with ``tools``; ``backend`` samples the turns (default: the fast
    loop on a CPU, ``generate`` elsewhere)."""

    def __init__(self, model, tokenizer, tools: ToolRegistry, cfg: AgentConfig, backend: RolloutBackend | None = None):
        self.model, self.tok, self.tools, self.cfg = model, tokenizer, tools, cfg
        self.backend = backend or default_backend(next(model.parameters()).device)
        self.renderer = ChatRenderer(tokenizer)
        limit = cfg.max_context or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.max_context = limit
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def new_episode(self, task: Task, user_message: str | None = None, index: int = 0) -> _Live:
        content = user_message if user_message is not None else agent_prompt(task.question, self.tools)
        prompt = self.renderer.prompt_segment(content)
        ep = Episode(task.id, task.question, [{"role": "user", "content": content}],
                     answer=_first(task.answer), segments=[prompt], meta={**task.meta, "answers": _all(task.answer)})
        return _Live(ep, prompt.text, list(prompt.ids), index)

    @torch.no_grad()
    def run(self, tasks: list[Task], seed: int = 0, progress: bool = False,
            user_messages: list[str] | None = None, max_turns: int | None = None, first_index: int = 0) -> list[Episode]:
        """Episodes for ``tasks``, in order. ``user_messages`` replaces the agent prompt (tools line
        + question) with other prompts, e.g. RAG or closed-book ones with ``max_turns=1``.
        ``first_index``: the index of ``tasks[0]`` in the whole run, when this call runs a share of it
        (its episodes then sample exactly what they would in one call)."""
        live = [self.new_episode(t, None if user_messages is None else user_messages[i], first_index + i)
                for i, t in enumerate(tasks)]
        turns = self.cfg.max_turns if max_turns is None else max_turns
        bar = tqdm(total=len(live), desc="episodes", unit="episode", disable=not progress)
        for turn in range(turns):
            active = [s for s in live if not s.done]
            for start in range(0, len(active), self.cfg.decode_batch_size):
                chunk = active[start:start + self.cfg.decode_batch_size]
                for state, ids in zip(chunk, self._sample(chunk, turn_seeds(seed, [s.index for s in chunk], turn))):
                    self._step(state, ids, last_turn=turn == turns - 1)
                    bar.update(int(state.done))
        for s in live:
            if not s.done:
                s.episode.stop_reason = "max_turns"
                s.done = True
                bar.update(1)
        bar.close()
        return [s.episode for s in live]

    # --- one turn ------------------------------------------------------------------------------

    def _sample(self, chunk: list[_Live], seeds: list[int]) -> list[list[int]]:
        """One sampled turn per episode (token ids, before cutting), each within its context budget."""
        budgets = [max(0, self.max_context - len(s.ids)) for s in chunk]
        new = min(self.cfg.max_new_tokens, max(budgets))
        if new < 1:
            return [[] for _ in chunk]
        width = max(len(s.ids) for s in chunk)
        pad = self.tok.pad_token_id
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, width - len(s.ids):] = torch.tensor(s.ids)
            mask[i, width - len(s.ids):] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        params = SamplingParams(new, self.cfg.temperature, self.cfg.top_p, self.cfg.top_k)
        was_training = self.model.training
        self.model.eval()
        try:
            tokens = self.backend.decode(self.model, ids, mask, params, sorted(self.eos_ids), pad, seeds=seeds).tokens
        finally:
            self.model.train(was_training)
        return [row[:b].tolist() for row, b in zip(tokens.cpu(), budgets)]

    def _cut(self, ids: list[int]) -> tuple[list[int], bool]:
        """The turn's tokens up to and including the end-of-turn token, or up to a stop sequence
        (excluded). Returns (ids, ended_by_eos)."""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:i + 1]
                break
        ended = bool(ids) and ids[-1] in self.eos_ids
        text = self.renderer.decode(ids[:-1] if ended else ids)
        hits = [text.find(s) for s in self.cfg.stop if s and s in text]
        if not hits:
            return ids, ended
        cut_at = min(hits)
        keep = 0
        for n in range(1, len(ids) + 1):  # the longest prefix whose text ends before the stop begins
            if len(self.renderer.decode(ids[:n])) <= cut_at:
                keep = n
            else:
                break
        return ids[:keep], False

    def _step(self, state: _Live, sampled: list[int], last_turn: bool) -> None:
        ep = state.episode
        if not sampled:
            ep.stop_reason, state.done = "context", True
            return
        ids, ended = self._cut(sampled)
        content = self.renderer.decode(ids[:-1] if ended else ids)
        if ids:
            seg = Segment("model", self.renderer.decode(ids), ids)
            ep.segments.append(seg)
            state.text += seg.text
            state.ids.extend(ids)
        ep.messages.append({"role": "assistant", "content": content})
        parsed = parse_turn(content, self.tools.names())
        if parsed.is_answer:
            ep.final_answer, ep.stop_reason, state.done = parsed.answer, "answer", True
            return
        ep.tool_calls += 1  # every turn that is not an answer is a call; a malformed one is an invalid call
        if parsed.error is not None:
            obs = error_observation(parsed.error)
            ep.invalid_calls += 1
        else:
            result = self.tools.call(parsed.tool, parsed.tool_input)
            if result.error is not None:
                obs = error_observation(result.error)
                ep.invalid_calls += 1
            else:
                obs = observation(result.text, self.cfg.observation_chars)
        ep.messages.append({"role": "tool", "content": obs})
        if last_turn:
            return
        history = [{"role": m["role"] if m["role"] != "tool" else self.renderer.observation_role, "content": m["content"]}
                   for m in ep.messages]
        seg = self.renderer.env_segment(history, state.text)
        ep.segments.append(seg)
        state.text += seg.text
        state.ids.extend(seg.ids)
        if len(state.ids) >= self.max_context:
            ep.stop_reason, state.done = "context", True


def _first(answer) -> str | None:
    return answer[0] if isinstance(answer, list) else answer


def _all(answer) -> list[str]:
    if answer is None:
        return []
    return list(answer) if isinstance(answer, list) else [answer]
