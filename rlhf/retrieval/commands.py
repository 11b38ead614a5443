"""``rlhf index build | add | search | info``: thin entry points over rlhf.retrieval.index."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import click

from rlhf.config import config_command, opt
from rlhf.errors import ConfigError
from rlhf.retrieval.documents import read_documents
from rlhf.retrieval.index import MODES, Index


@click.group(name="index")
def index() -> None:
    """Document indexes for retrieval: BM25 + dense MiniLM, hybrid ranking (RAG and agents search them)."""


@dataclass
class IndexBuildConfig:
    """Index a file or folder of documents (.txt, .md, .jsonl) for BM25, dense and hybrid search."""

    docs: str = opt(help="A document file or a folder (read recursively): .txt, .md, .markdown, .jsonl (id + text per line).")
    out: str = opt(help="Index folder to write (replaced atomically if it exists).")
    chunk_words: int = opt(80, help="Words per chunk.")
    overlap: int = opt(20, help="Words shared by consecutive chunks of a document.")
    dense: bool = opt(True, help="Also embed chunks with MiniLM for dense and hybrid search (off: BM25 only).")
    encoder: str = opt("minilm", help="Sentence encoder for dense vectors: 'minilm' (packaged) or a local HF encoder folder.")
    device: str = opt("cpu", help="Device for the encoder (cpu, cuda, cuda:N or auto), as the engine's --device.")
    threads: int = opt(0, help="CPU threads for torch (0 = auto), as the engine's --threads.")

    def validate(self) -> None:
        if self.chunk_words < 1 or not 0 <= self.overlap < self.chunk_words:
            raise ConfigError("--chunk-words must be ≥ 1 and --overlap in [0, chunk-words)")


def _start(device: str, threads: int) -> str:
    """Apply device and threads through the engine (the one place that changes process-wide state;
    indexing neither trains nor samples, so the rest of the engine section does not apply here).
    Returns the resolved device."""
    from rlhf.engine.config import EngineConfig
    from rlhf.engine.runtime import start

    engine = EngineConfig(device=device, threads=threads)
    engine.validate()
    return str(start(engine).device)


@config_command(IndexBuildConfig, name="build")
def build(cfg: IndexBuildConfig) -> None:
    """Read, chunk (with overlap), index with BM25 and embed; prints a JSON summary."""
    device = _start(cfg.device, cfg.threads)
    t0 = time.perf_counter()
    docs, passed_over = read_documents(cfg.docs)
    ix = Index.build(docs, cfg.chunk_words, cfg.overlap, cfg.dense, cfg.encoder, device)
    ix.save(cfg.out)
    click.echo(json.dumps({"documents": len(docs), "chunks": len(ix), "dense": cfg.dense, "passed_over": passed_over,
                           "seconds": round(time.perf_counter() - t0, 2), "out": cfg.out}))


@index.command("add")
@click.argument("index_dir", metavar="INDEX", type=click.Path())
@click.option("--docs", required=True, help="Documents to add (file or folder). Known ids: unchanged text is skipped, changed text replaced.")
@click.option("--device", default="cpu", show_default=True, help="Device for the encoder, as the engine's --device.")
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads for torch (0 = auto), as the engine's --threads.")
def add(index_dir: str, docs: str, device: str, threads: int) -> None:
    """Add documents to an index: only new or changed documents are embedded."""
    device = _start(device, threads)
    t0 = time.perf_counter()
    ix = Index.load(index_dir, device=device)
    documents, passed_over = read_documents(docs)
    counts = ix.add(documents)
    ix.save(index_dir)
    click.echo(json.dumps({**counts, "chunks": len(ix), "passed_over": passed_over,
                           "seconds": round(time.perf_counter() - t0, 2), "index": index_dir}))


@index.command("search")
@click.argument("index_dir", metavar="INDEX", type=click.Path())
@click.argument("query")
@click.option("--k", "-k", "k", type=int, default=3, show_default=True, help="How many chunks to return.")
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True, help="Ranking: BM25, dense, or both fused (RRF).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit instead of text.")
def search(index_dir: str, query: str, k: int, mode: str, as_json: bool) -> None:
    """The best chunks for QUERY, best first, with their ids."""
    if k < 1:
        raise ConfigError("--k must be at least 1")
    hits = Index.load(index_dir).search(query, k, mode)
    if not hits:
        click.echo("no chunk shares a word with the query" if mode == "bm25" else "the index is empty", err=True)
    for h in hits:
        click.echo(json.dumps(h.to_json(), ensure_ascii=False) if as_json else f"{h.rank}. [{h.chunk_id}] ({h.score:.4f}) {h.text}")


@index.command("info")
@click.argument("index_dir", metavar="INDEX", type=click.Path())
def info(index_dir: str) -> None:
    """What an index holds: documents, chunks, chunking and encoder."""
    ix = Index.load(index_dir)
    m = ix.manifest
    click.echo(json.dumps({"documents": len(m["documents"]), "chunks": len(ix), "chunk_words": m["chunk_words"],
                           "overlap": m["overlap"], "encoder": m["encoder"]}))


index.add_command(build)
