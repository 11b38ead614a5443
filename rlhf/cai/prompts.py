"""The texts the feedback model reads: comparison, yes/no, critique and revision requests.

Each builder returns chat messages plus the beginning of the assistant's answer, so that the next
token is the option label (Bai et al. 2022 end their prompt with "The answer is: ("). The
conversation always comes first and the principle's question last: prompts for one conversation
under several principles then share a long beginning, which the local feedback model runs once.
"""

from __future__ import annotations

import re

from rlhf.cai.constitution import ComparisonExample, Constitution, CritiqueExample, Principle

ANSWER_PREFIX = "The answer is ("
REASONING_PREFIX = "Let's think step by step."
AFTER_REASONING = "\nSo the answer is ("
OPTION_LABELS = ("A", "B")
YES_NO = ("Yes", "No")
# A worked example and the principle it was written for (None: shown under the principle being asked).
Shot = tuple[ComparisonExample | CritiqueExample, Principle | None]


def plain_chat(messages: list[dict], assistant_prefix: str = "") -> str:
    """A dialogue as plain text in the Human/Assistant style, for models and servers without a known template."""
    parts = []
    for m in messages:
        role = {"user": "Human", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"].title())
        parts.append(f"\n\n{role}: {m['content']}")
    return "".join(parts) + "\n\nAssistant:" + (" " + assistant_prefix if assistant_prefix else "")


def chat_with_template(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """The tokenizer's chat template with the assistant's turn opened (and ``assistant_prefix`` already written)."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat(messages, assistant_prefix)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix


def conversation_text(prompt: str) -> str:
    """A prompt as dialogue text: Anthropic-HH dialogues keep their turns, a plain request becomes one turn."""
    text = prompt.strip()
    if text.endswith("Assistant:"):
        text = text[: -len("Assistant:")].rstrip()
    if "Human:" not in text:
        text = f"Human: {text}"
    return text


PERSONA_HEAD = "You are a careful, honest and harmless AI assistant."


def dialogue_messages(prompt: str) -> list[dict]:
    """A prompt as chat turns: Anthropic-HH dialogues split at their Human:/Assistant: tags, a plain request is one turn."""
    text = conversation_text(prompt)
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", "\n\n" + text)
    messages = []
    for i in range(1, len(parts) - 1, 2):
        content = parts[i + 1].strip()
        if content:
            messages.append({"role": "user" if parts[i] == "Human" else "assistant", "content": content})
    return messages or [{"role": "user", "content": text}]


def persona_messages(prompt: str, principles: list[Principle]) -> list[dict]:
    """The conversation under a system prompt made of the principles' personas (Askell et al. 2021's HHH
    prompt, written from the constitution); the reply's likelihood here is compared with the plain one."""
    personas = " ".join(p.persona for p in principles if p.persona)
    return [{"role": "system", "content": f"{PERSONA_HEAD} {personas}".strip()}] + dialogue_messages(prompt)


def user_request(prompt: str) -> str:
    """The last thing the person asked (for critique and revision of a reply to it)."""
    text = conversation_text(prompt)
    return text.rsplit("Human:", 1)[-1].strip() if "Human:" in text else text


def _comparison_body(prompt: str, first: str, second: str, question: str) -> str:
    return (f"Here is a conversation between a person and an AI assistant.\n\n{conversation_text(prompt)}\n\n"
            f"Two possible next replies of the assistant:\n\n(A) {first.strip()}\n\n(B) {second.strip()}\n\n"
            f"{question} Answer with A or B.")


def comparison_messages(prompt: str, first: str, second: str, principle: Principle,
                        examples: list[Shot] = (), reasoning: bool = False) -> list[dict]:
    """A multiple-choice question: which of two replies better keeps ``principle``.

    ``examples`` are worked comparisons shown as earlier turns (few-shot), each under the principle
    its answer was written for (see ``examples_for``). With ``reasoning`` the request asks for a short
    explanation first; the caller generates it and then reads the label.
    """
    messages: list[dict] = []
    for ex, written_for in examples:
        question = (written_for or principle).comparison
        messages.append({"role": "user", "content": _comparison_body(ex.prompt, ex.a, ex.b, question)})
        messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX}{ex.answer})"})
    body = _comparison_body(prompt, first, second, principle.comparison)
    if reasoning:
        body += " First explain your reasoning in one or two sentences, then give the answer."
    messages.append({"role": "user", "content": body})
    return messages


def pointwise_messages(prompt: str, reply: str, principle: Principle) -> list[dict]:
    """A yes/no question about one reply (Yes = the reply keeps the principle)."""
    question = principle.pointwise or f"Does this reply pass the following test: {principle.comparison}"
    body = (f"Here is a conversation between a person and an AI assistant.\n\n{conversation_text(prompt)}\n\n"
            f"The assistant's next reply:\n\n{reply.strip()}\n\n{question} Answer Yes or No.")
    return [{"role": "user", "content": body}]


def _critique_turns(prompt: str, reply: str, principle_text: str) -> list[dict]:
    return [{"role": "user", "content": f"{user_request(prompt)}"},
            {"role": "assistant", "content": reply.strip()},
            {"role": "user", "content": f"Critique request: {principle_text}"}]


def critique_messages(prompt: str, reply: str, principle: Principle, examples: list[Shot] = ()) -> list[dict]:
    """Ask for a critique of ``reply`` under ``principle``, after worked examples (Bai et al. 2022, §3.1),
    each under the requests of the principle it was written for."""
    messages: list[dict] = []
    for ex, written_for in examples:
        shown = written_for or principle
        messages += _critique_turns(ex.prompt, ex.reply, shown.critique)
        messages.append({"role": "assistant", "content": f"Critique: {ex.critique}"})
        messages.append({"role": "user", "content": f"Revision request: {shown.revision}"})
        messages.append({"role": "assistant", "content": f"Revision: {ex.revision}"})
    return messages + _critique_turns(prompt, reply, principle.critique)


def revision_messages(prompt: str, reply: str, critique: str, principle: Principle,
                      examples: list[Shot] = ()) -> list[dict]:
    """The critique conversation continued with the revision request."""
    return critique_messages(prompt, reply, principle, examples) + [
        {"role": "assistant", "content": f"Critique: {critique}"},
        {"role": "user", "content": f"Revision request: {principle.revision}"}]


def examples_for(constitution: Constitution, kind: str, count: int) -> list[Shot]:
    """The first ``count`` worked examples of a kind ("comparison" or "critique"), each with the
    principle it was written for (None where it names none: it is then shown under the principle asked).

    An example's answer answers its own principle's question: the respect example's "B" is no answer
    to "which reply gives less help with something dangerous?". Shown under its own question, the
    worked examples also read the same whatever principle is asked, so a local model runs them once.
    """
    pool = constitution.comparison_examples if kind == "comparison" else constitution.critique_examples
    return [(ex, constitution.principle(ex.principle) if ex.principle else None) for ex in pool[:count]]
