"""Retrieval over a user's documents: reading and chunking (documents.py), the BM25 + dense index
with hybrid ranking (index.py), RAG prompts (rag.py) and the ``rlhf index`` verb (commands.py)."""
