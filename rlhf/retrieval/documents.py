"""Reading a user's documents and cutting them into overlapping chunks for the index.

Three kinds of file are read:

* ``.txt`` and ``.md`` / ``.markdown`` — one document per file, its id the path relative to the
  folder given (``notes/rivers.md``);
* ``.jsonl`` (optionally ``.jsonl.gz``) — one document per line: ``{"id": "...", "text": "..."}``
  (``content`` or ``body`` also accepted for the text; a ``title`` is put in front of the text; a
  missing id becomes ``<file>:<line>``).

A document is cut into chunks of ``chunk_words`` words, each starting ``chunk_words − overlap``
words after the previous one, so a sentence cut at a chunk's end is whole in the next one. A chunk's
id is ``<document id>#<n>``: the id a RAG prompt shows and a grounding check looks up.

Bad input stops the build with the file (and line) at fault: an empty document, a file that is not
UTF-8 text, a record without text. Other files in a folder (images, ...) are passed over and listed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from rlhf.data.io import iter_jsonl
from rlhf.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_FIELDS = ("text", "content", "body")


@dataclass
class Document:
    id: str
    text: str
    source: str  # file the document came from ("path" or "path:line" for JSON Lines)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class Chunk:
    id: str       # "<document id>#<n>"
    doc_id: str
    text: str
    source: str

    def to_json(self) -> dict:
        return {"id": self.id, "doc_id": self.doc_id, "text": self.text, "source": self.source}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def is_document_file(path: Path) -> bool:
    return _suffix(path) in TEXT_SUFFIXES + JSONL_SUFFIXES


def read_text_document(path: Path, doc_id: str) -> Document:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, None, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, f"is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it or leave it out") from None
    if "\x00" in text:
        raise DataError(path, None, "holds NUL bytes: a binary file, not a text document")
    if not text.strip():
        raise DataError(path, None, "is an empty document (no text to index)")
    return Document(doc_id, text, str(path))


def read_jsonl_documents(path: Path) -> list[Document]:
    docs, seen = [], set()
    for line, obj in iter_jsonl(path):
        key = next((k for k in TEXT_FIELDS if k in obj), None)
        if key is None:
            raise DataError(path, line, f"no text: a document record needs one of {', '.join(TEXT_FIELDS)}; "
                                        f"record has: {', '.join(sorted(obj)) or 'nothing'}")
        text = obj[key]
        if not isinstance(text, str):
            raise DataError(path, line, f"expected a string, got {type(text).__name__}", key)
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(path, line, f"expected a string, got {type(title).__name__}", "title")
        if title:
            text = f"{title}. {text}" if text.strip() else title
        if not text.strip():
            raise DataError(path, line, "is an empty document (no text to index)", key)
        doc_id = obj.get("id", f"{path.name}:{line}")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or not str(doc_id).strip():
            raise DataError(path, line, f"expected a non-empty string or integer id, got {doc_id!r}", "id")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise DataError(path, line, f"document id {doc_id!r} appears twice in this file", "id")
        seen.add(doc_id)
        docs.append(Document(doc_id, text, f"{path}:{line}"))
    return docs


def read_documents(root: str | Path) -> tuple[list[Document], list[str]]:
    """Documents under ``root`` (a file or a folder, read recursively in sorted order) and the files
    passed over because their kind is not read. Raises DataError for a bad document, ConfigError when
    there is nothing to index."""
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"--docs {root}: no such file or folder")
    if root.is_file():
        if not is_document_file(root):
            raise ConfigError(f"--docs {root}: cannot index this kind of file; expected "
                              f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")
        files, base = [root], root.parent
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        base = root
    docs: list[Document] = []
    passed_over: list[str] = []
    for f in files:
        if not is_document_file(f):
            passed_over.append(str(f))
            continue
        if _suffix(f) in JSONL_SUFFIXES:
            docs.extend(read_jsonl_documents(f))
        else:
            docs.append(read_text_document(f, f.relative_to(base).as_posix()))
    if not docs:
        raise ConfigError(f"--docs {root}: no documents found (read: {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
    ids: dict[str, str] = {}
    for d in docs:
        if d.id in ids:
            raise DataError(d.source, None, f"document id {d.id!r} is also used by {ids[d.id]}; ids must be unique")
        ids[d.id] = d.source
    return docs, passed_over


def chunk_document(doc: Document, chunk_words: int, overlap: int) -> list[Chunk]:
    """Word windows of ``chunk_words`` words, consecutive windows sharing ``overlap`` words.

    The last window is dropped when it lies wholly inside the one before (nothing new in it)."""
    if chunk_words < 1 or not 0 <= overlap < chunk_words:
        raise ConfigError(f"chunking needs chunk_words ≥ 1 and 0 ≤ overlap < chunk_words (got {chunk_words}, {overlap})")
    words = doc.text.split()
    stride = chunk_words - overlap
    chunks = []
    for n, start in enumerate(range(0, max(1, len(words) - overlap), stride)):
        chunks.append(Chunk(f"{doc.id}#{n}", doc.id, " ".join(words[start:start + chunk_words]), doc.source))
    return chunks
