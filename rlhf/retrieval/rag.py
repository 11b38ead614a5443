"""Retrieval-augmented prompts: the passages an index returns, with their ids, in front of the prompt.

    Passages:
    [rivers.md#0] The Okta runs through Plimsa ...
    [people.jsonl#3] ...
    Question: Which river runs through Plimsa?

Each passage line starts with its chunk id in brackets, so a reply can cite it and a judge can
check that an answer is grounded in what was shown. The completions record keeps the passages
(id, text, score) and the exact prompt the model saw (``grounding_fields``).
"""

from __future__ import annotations

from rlhf.retrieval.index import Hit

RAG_TEMPLATE = "Passages:\n{passages}\nQuestion: {prompt}"


def format_passages(hits: list[Hit]) -> str:
    return "\n".join(f"[{h.chunk_id}] {h.text}" for h in hits)


def rag_prompt(prompt: str, hits: list[Hit]) -> str:
    """The prompt with retrieved passages in front (the chat template is applied later, as for any prompt)."""
    return RAG_TEMPLATE.format(passages=format_passages(hits), prompt=prompt)


def grounding_fields(hits: list[Hit], model_prompt: str, index_path: str, mode: str) -> dict:
    """What a completions record keeps about retrieval: the passages shown, in order, and the prompt."""
    return {"passages": [{"id": h.chunk_id, "doc_id": h.doc_id, "text": h.text, "score": round(h.score, 6)} for h in hits],
            "model_prompt": model_prompt, "retrieval": {"index": index_path, "mode": mode, "k": len(hits)}}
