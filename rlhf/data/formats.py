"""Pair layouts found in the wild, all reduced to (prompt, chosen reply, rejected reply).

* ours / TRL explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
* TRL conversational: the same keys holding lists of ``{"role", "content"}`` messages;
* TRL implicit prompt and Anthropic HH: ``{"chosen": full text, "rejected": full text}`` sharing a
  dialogue prefix. HH texts look like ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is
  everything up to and including the last ``Assistant:`` tag they share, the replies the rest.
"""

from __future__ import annotations

import os
from typing import Any

ASSISTANT_TAG = "\n\nAssistant:"


def _messages_to_text(messages: list[dict], where, field_: str) -> str:
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m:
            raise where.fail(f"message {i} must be an object with 'role' and 'content'", field_)
        parts.append(str(m["content"]) if len(messages) == 1 else f"{m.get('role', 'user')}: {m['content']}")
    return "\n".join(parts)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two full dialogues into (prompt, chosen reply, rejected reply), or None if no prefix is shared.

    The cut goes after the last assistant tag inside the common prefix (HH style); without such a
    tag, after the last whitespace of the common prefix so that no word is split.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_TAG)
    if cut >= 0:
        cut += len(ASSISTANT_TAG)
    else:
        cut = max(common.rfind(" "), common.rfind("\n")) + 1
    if cut <= 0:
        return None
    return chosen[:cut], chosen[cut:].lstrip(" "), rejected[cut:].lstrip(" ")


def normalise_pair(obj: dict[str, Any], where) -> tuple[str, str, str]:
    for key in ("chosen", "rejected"):
        if key not in obj or obj[key] is None:
            raise where.fail(f"missing required field; a pair needs 'chosen' and 'rejected' (record has: {', '.join(sorted(obj))})", key)
    chosen, rejected = obj["chosen"], obj["rejected"]
    prompt = obj.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):  # TRL conversational
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise where.fail("one side is a message list and the other is not", "chosen")
        if prompt is None:  # implicit prompt: shared leading messages
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        prompt = _messages_to_text(prompt, where, "prompt") if isinstance(prompt, list) else prompt
        chosen = _messages_to_text(chosen, where, "chosen") if chosen else ""
        rejected = _messages_to_text(rejected, where, "rejected") if rejected else ""
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise where.fail(f"expected a string or a list of messages, got {type(value).__name__}", key)
    if prompt is None:
        split = split_shared_prefix(chosen, rejected)
        if split is None:
            raise where.fail("no 'prompt' field and chosen/rejected share no dialogue prefix to split on", "prompt")
        prompt, chosen, rejected = split
    if isinstance(prompt, list):
        prompt = _messages_to_text(prompt, where, "prompt")
    if not isinstance(prompt, str):
        raise where.fail(f"expected a string, got {type(prompt).__name__}", "prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise where.fail("is empty: a pair needs a reply on both sides", key)
    return prompt, chosen, rejected
