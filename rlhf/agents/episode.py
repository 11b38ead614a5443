"""Episodes: every token of a multi-turn ReAct conversation, with who wrote it.

An episode is the conversation as chat messages (``user`` question, ``assistant`` turns, ``tool``
observations) and, beside it, the exact token sequence the policy saw and wrote, cut into
segments by author:

    prompt   the chat template around the user's message, and the message (tools line + question)
    model    what the policy sampled: a turn's text and its end-of-turn token
    env      what the environment added: the observation, and the template text around it

The loss mask follows from the record alone: 1 on ``model`` tokens, 0 on everything else. SFT
traces are episodes without token ids (they are rendered with the target model's chat template
when encoded); sampled episodes keep the ids they were sampled with, so that training scores the
very tokens the policy drew.

Rendering goes through the tokenizer's chat template, message by message: after each model turn
the environment's segment is whatever the template adds between the turn and the next generation
prompt (the end of the assistant turn if the model did not write it, the observation, the next
assistant cue). Observations use the template's ``tool`` role where it renders one, else ``user``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.data.io import iter_jsonl
from rlhf.errors import DataError
from rlhf.utils.io import atomic_write_text

Author = Literal["prompt", "model", "env"]
AUTHORS = ("prompt", "model", "env")
ROLES = ("user", "assistant", "tool")


@dataclass
class Segment:
    author: Author
    text: str
    ids: list[int] | None = None  # token ids as sampled / fed; None until rendered for a tokenizer

    def to_json(self) -> dict:
        out = {"author": self.author, "text": self.text}
        if self.ids is not None:
            out["ids"] = self.ids
        return out


@dataclass
class Episode:
    id: str
    question: str
    messages: list[dict]                  # [{"role": "user"|"assistant"|"tool", "content": str}, ...]
    answer: str | None = None             # the gold answer, when the task has one
    final_answer: str | None = None       # what the agent answered (None: it never did)
    stop_reason: str = ""                 # answer | max_turns | context | ""
    tool_calls: int = 0                   # actions the agent wrote (valid or not)
    invalid_calls: int = 0                # actions that produced an error observation
    reward: float | None = None
    segments: list[Segment] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def ids_and_mask(self) -> tuple[list[int], list[int]]:
        """Token ids of the whole episode and the loss mask (1 where the policy wrote the token)."""
        ids, mask = [], []
        for s in self.segments:
            if s.ids is None:
                raise ValueError(f"episode {self.id}: segments are not tokenized (render it for a tokenizer first)")
            ids.extend(s.ids)
            mask.extend([1 if s.author == "model" else 0] * len(s.ids))
        return ids, mask

    def prompt_length(self) -> int:
        """Tokens before the first model token (the part that is the same for every sample of a task)."""
        n = 0
        for s in self.segments:
            if s.author != "prompt":
                break
            n += len(s.ids or [])
        return n

    def to_json(self) -> dict:
        out = {"id": self.id, "question": self.question, "answer": self.answer, "final_answer": self.final_answer,
               "stop_reason": self.stop_reason, "turns": self.turns, "tool_calls": self.tool_calls,
               "invalid_calls": self.invalid_calls, "reward": self.reward, "messages": self.messages}
        if self.segments:
            out["segments"] = [s.to_json() for s in self.segments]
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "<episode>", line: int | None = None) -> "Episode":
        def fail(msg: str, fld: str | None = None) -> DataError:
            return DataError(path, line, msg, fld)

        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise fail("expected a non-empty list of messages", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise fail(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {m!r}", "messages")
        if msgs[0]["role"] != "user":
            raise fail("the first message must be the user's (the question)", "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise fail("no assistant message: nothing for a model to learn or be scored on", "messages")
        segments = []
        for i, s in enumerate(obj.get("segments") or []):
            if not isinstance(s, dict) or s.get("author") not in AUTHORS or not isinstance(s.get("text"), str):
                raise fail(f"segment {i} must be {{'author': one of {', '.join(AUTHORS)}, 'text': ...}}", "segments")
            ids = s.get("ids")
            if ids is not None and (not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids)):
                raise fail(f"segment {i}: ids must be a list of integers", "segments")
            segments.append(Segment(s["author"], s["text"], ids))
        eid = obj.get("id", f"{Path(str(path)).stem}-{line}")
        return cls(id=str(eid), question=str(obj.get("question") or msgs[0]["content"]), messages=msgs,
                   answer=obj.get("answer"), final_answer=obj.get("final_answer"), stop_reason=obj.get("stop_reason", ""),
                   tool_calls=int(obj.get("tool_calls", 0)), invalid_calls=int(obj.get("invalid_calls", 0)),
                   reward=obj.get("reward"), segments=segments, meta=obj.get("meta") or {})


def read_episodes(path: str | Path) -> list[Episode]:
    out = [Episode.from_json(obj, path, line) for line, obj in iter_jsonl(path)]
    if not out:
        raise DataError(path, None, "holds no episodes")
    return out


def write_episodes(path: str | Path, episodes: list[Episode]) -> None:
    atomic_write_text(path, "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in episodes))


def is_episode_file(path: str | Path) -> bool:
    """Whether a JSON Lines file holds episodes (records with ``messages``) rather than prompt/completion pairs."""
    for _, obj in iter_jsonl(path):
        return "messages" in obj
    return False


# --- rendering with a chat template ------------------------------------------------------------

class ChatRenderer:
    """Turns messages into author-tagged token segments with a tokenizer's chat template."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.observation_role = self._observation_role()

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not self.has_template:  # plain text: messages one per line, no cues
            text = "".join(m["content"] + "\n" for m in messages)
            return text
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _observation_role(self) -> str:
        if not self.has_template:
            return "tool"
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "OBS-PROBE"}]
        try:
            return "tool" if "OBS-PROBE" in self._render(probe, True) else "user"
        except Exception:  # noqa: BLE001 - templates raise their own errors for roles they lack
            return "user"

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def end_of_turn(self) -> str:
        return self.tok.eos_token or ""

    def prompt_segment(self, user_content: str) -> Segment:
        text = self._render([{"role": "user", "content": user_content}], True)
        return Segment("prompt", text, self.encode(text))

    def env_segment(self, messages: list[dict], so_far: str) -> Segment:
        """What the template adds after the last model turn up to the next generation prompt.

        ``messages`` ends with the observation; ``so_far`` is the text of every segment so far.
        A template that rewrites earlier turns (trims a reply, drops a thought) breaks the prefix:
        then the difference between rendering with and without the observation is used."""
        full = self._render(messages, True)
        if full.startswith(so_far):
            text = full[len(so_far):]
        else:
            without = self._render(messages[:-1], False)
            text = full[len(without):] if full.startswith(without) else self._render(messages[-1:], True)
            if not so_far.endswith(self.end_of_turn()):
                text = self.end_of_turn() + text
        return Segment("env", text, self.encode(text))

    def render(self, episode: Episode) -> list[Segment]:
        """Segments for a whole conversation (SFT traces): each assistant message becomes a model
        segment with the end-of-turn token, the rest prompt/env segments from the template."""
        msgs = episode.messages
        segments = [self.prompt_segment(msgs[0]["content"])]
        so_far = segments[0].text
        history = [msgs[0]]
        for m in msgs[1:]:
            if m["role"] == "assistant":
                text = m["content"] + self.end_of_turn()
                segments.append(Segment("model", text, self.encode(m["content"]) + self._eot_ids()))
                so_far += text
                history.append(m)
            else:
                history.append({"role": self.observation_role, "content": m["content"]})
                seg = self.env_segment(history, so_far)
                segments.append(seg)
                so_far += seg.text
        return segments

    def _eot_ids(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []


def encode_for_training(episode: Episode, renderer: ChatRenderer, max_length: int) -> tuple[list[int], list[int]] | None:
    """(ids, labels) for SFT: labels are the ids where the policy wrote them and −100 elsewhere
    (prompt, observations, template text). Episodes with recorded ids keep them; others are
    rendered with ``renderer``'s chat template. None when the episode does not fit ``max_length``
    (cutting it would drop the turns that matter most: the last ones)."""
    segments = episode.segments if episode.segments and all(s.ids is not None for s in episode.segments) else renderer.render(episode)
    ids, labels = [], []
    for s in segments:
        ids.extend(s.ids)
        labels.extend(s.ids if s.author == "model" else [-100] * len(s.ids))
    if len(ids) > max_length or not any(lab != -100 for lab in labels):
        return None
    return ids, labels


def encode_episode_file(path: str | Path, tokenizer, max_length: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Every episode of a file encoded for SFT, and how many were left out for not fitting."""
    renderer = ChatRenderer(tokenizer)
    encoded, too_long = [], 0
    for ep in read_episodes(path):
        e = encode_for_training(ep, renderer, max_length)
        if e is None:
            too_long += 1
        else:
            encoded.append(e)
    return encoded, too_long
