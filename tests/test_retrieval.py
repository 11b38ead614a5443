"""The document index: reading and chunking, BM25 / dense / hybrid search, safe files, incremental
add, clear errors; RAG generation keeps the passages it showed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rlhf.cli import app
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError, DataError
from rlhf.retrieval.documents import Document, chunk_document, read_documents
from rlhf.retrieval.index import Index, _reciprocal_rank_fusion, recall_at_k
from rlhf.retrieval.rag import rag_prompt

DOCS = {
    "rivers.md": "# Rivers\nThe Okta runs through Plimsa and is known for its green water.",
    "people/zorvik.txt": "Zorvik lives in Plimsa and works at the Brindel mill as a baker.",
    "firms.jsonl": json.dumps({"id": "brindel", "title": "Brindel", "text": "Brindel is a mill based in Quenta."}) + "\n"
                   + json.dumps({"id": "quenta", "text": "Quenta is a harbour town with a lighthouse."}) + "\n",
}


def write_docs(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Index]:
    root = write_docs(tmp_path_factory.mktemp("docs"), DOCS)
    (root / "picture.png").write_bytes(b"\x89PNG")
    docs, passed_over = read_documents(root)
    assert [Path(p).name for p in passed_over] == ["picture.png"]
    index = Index.build(docs, chunk_words=8, overlap=3)
    out = tmp_path_factory.mktemp("index") / "ix"
    index.save(out)
    return out, index


def test_documents_are_read_by_kind_with_ids():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        docs, _ = read_documents(write_docs(Path(d), DOCS))
    by_id = {doc.id: doc for doc in docs}
    assert set(by_id) == {"rivers.md", "people/zorvik.txt", "brindel", "quenta"}
    assert by_id["brindel"].text.startswith("Brindel. Brindel is a mill")  # the title goes in front


def test_chunks_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(20)]
    chunks = chunk_document(Document("d", " ".join(words), "x"), chunk_words=8, overlap=3)
    assert [c.id for c in chunks] == ["d#0", "d#1", "d#2", "d#3"]
    spans = [c.text.split() for c in chunks]
    assert all(a[-3:] == b[:3] for a, b in zip(spans, spans[1:]))  # consecutive chunks share 3 words
    assert {w for s in spans for w in s} == set(words)
    assert len(chunk_document(Document("s", "one two", "x"), 8, 3)) == 1
    with pytest.raises(ConfigError):
        chunk_document(Document("d", "a b", "x"), chunk_words=4, overlap=4)


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"   \n", "empty document"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("binary.md", b"ab\x00cd", "NUL bytes"),
    ("notext.jsonl", b'{"id": "a", "title": 3}\n', "no text"),
    ("badjson.jsonl", b'{"id": "a", "text": "x"}\n{nope\n', "malformed JSON"),
    ("emptytext.jsonl", b'{"id": "a", "text": "  "}\n', "empty document"),
])
def test_bad_documents_name_the_file_and_what_is_wrong(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_documents(tmp_path)
    assert name in str(err.value)


def test_nothing_to_index_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_documents(tmp_path / "missing")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no documents found"):
        read_documents(tmp_path)
    with pytest.raises(ConfigError, match="cannot index this kind of file"):
        read_documents(tmp_path / "a.png")


def test_search_finds_the_right_chunk_in_every_mode(built):
    folder, index = built
    for mode in ("bm25", "dense", "hybrid"):
        hits = index.search("Who lives in Plimsa and bakes at the mill?", k=2, mode=mode)
        assert hits[0].doc_id == "people/zorvik.txt", (mode, hits)
        assert [h.rank for h in hits] == [1, 2]
    assert index.search("lighthouse harbour", k=1, mode="bm25")[0].doc_id == "quenta"
    assert index.search("the of and", k=3, mode="bm25") == []  # stop words only: no BM25 match


def test_index_files_are_safe_and_load_back_identically(built):
    folder, index = built
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "index.json" in names and "chunks.jsonl" in names and "embeddings.safetensors" in names
    assert all(n.endswith((".json", ".jsonl", ".npy", ".safetensors")) for n in names), names
    for npy in folder.rglob("*.npy"):
        np.load(npy, allow_pickle=False)  # plain arrays: loading them runs no code
    loaded = Index.load(folder)
    for mode in ("bm25", "dense", "hybrid"):
        a = index.search("green water river", k=3, mode=mode)
        b = loaded.search("green water river", k=3, mode=mode)
        assert [(h.chunk_id, round(h.score, 5)) for h in a] == [(h.chunk_id, round(h.score, 5)) for h in b]


def test_incremental_add_embeds_only_new_or_changed_documents(built, tmp_path, monkeypatch):
    folder, _ = built
    index = Index.load(folder)
    before = {c.id: c.text for c in index.chunks}
    embedded: list[str] = []
    real = type(index.encoder()).embed
    monkeypatch.setattr(type(index.encoder()), "embed", lambda self, texts: (embedded.extend(texts), real(self, texts))[1])
    docs = [Document("quenta", "Quenta is a harbour town with a lighthouse.", "x"),    # unchanged
            Document("brindel", "Brindel is a bakery based in Okta Falls.", "x"),      # changed
            Document("okta-falls", "Okta Falls has a glass museum.", "x")]  # new
    counts = index.add(docs)
    assert counts == {"added": 1, "replaced": 1, "unchanged": 1, "chunks_added": 2}
    assert sorted(embedded) == sorted(["Brindel is a bakery based in Okta Falls.", "Okta Falls has a glass museum."])
    index.save(folder)
    reloaded = Index.load(folder)
    assert reloaded.search("glass museum", k=1, mode="bm25")[0].doc_id == "okta-falls"
    assert reloaded.search("glass museum", k=1, mode="hybrid")[0].doc_id == "okta-falls"
    texts = {c.doc_id: c.text for c in reloaded.chunks}
    assert texts["brindel"] == "Brindel is a bakery based in Okta Falls."
    assert sum(1 for c in reloaded.chunks if c.doc_id == "brindel") == 1  # the old chunk is gone
    assert {k: v for k, v in before.items() if not k.startswith("brindel")}.items() <= {c.id: c.text for c in reloaded.chunks}.items()
    assert reloaded.embeddings.shape[0] == len(reloaded.chunks)


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = _reciprocal_rank_fusion([[(1, 9.0), (2, 5.0), (3, 1.0)], [(3, 0.9), (1, 0.8), (4, 0.1)]], k=3)
    assert [i for i, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_recall_at_k_counts_supporting_documents(built):
    _, index = built
    r = recall_at_k(index, ["lighthouse harbour", "lighthouse harbour"], [{"quenta"}, {"quenta", "rivers.md"}], k=1, mode="bm25")
    assert r.tolist() == [1.0, 0.5]


def test_index_cli_build_search_add(tmp_path):
    docs = write_docs(tmp_path / "docs", DOCS)
    runner = CliRunner()
    out = tmp_path / "ix"
    res = runner.invoke(app, ["index", "build", "--docs", str(docs), "--out", str(out), "--no-dense", "--chunk-words", "30"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["documents"] == 4
    res = runner.invoke(app, ["index", "search", str(out), "lighthouse", "--mode", "bm25", "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["id"] == "quenta#0"
    extra = write_docs(tmp_path / "more", {"new.txt": "A zeppelin lands in Quenta every spring."})
    res = runner.invoke(app, ["index", "add", str(out), "--docs", str(extra)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["added"] == 1
    res = runner.invoke(app, ["index", "search", str(out), "zeppelin", "--mode", "bm25", "-k", "1"])
    assert "[new.txt#0]" in res.output
    res = runner.invoke(app, ["index", "search", str(out), "zeppelin", "--mode", "dense"])
    assert isinstance(res.exception, ConfigError) and "without dense vectors" in str(res.exception)


def test_rag_generation_records_the_passages_shown(tmp_path, tiny_model_dir):
    from rlhf.rollout.commands import GenerateConfig, generate_file

    docs = write_docs(tmp_path / "docs", DOCS)
    index_dir = tmp_path / "ix"
    Index.build(read_documents(docs)[0], chunk_words=30, overlap=5, dense=False).save(index_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q1", "prompt": "Where is the lighthouse?"}) + "\n"
                       + json.dumps({"id": "q2", "prompt": "Who bakes at Brindel?"}) + "\n")
    out = tmp_path / "completions.jsonl"
    cfg = GenerateConfig(prompts=str(prompts), out=str(out), model=str(tiny_model_dir), num_completions=2,
                         max_new_tokens=4, index=str(index_dir), passages=2, index_mode="bm25",
                         engine=EngineConfig(device="cpu", threads=1))
    cfg.validate()
    generate_file(cfg)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Where is the lighthouse?", "Who bakes at Brindel?"]  # the user's prompt, unchanged
    first = records[0]
    assert first["passages"][0]["id"] == "quenta#0" and len(first["passages"]) <= 2
    assert first["retrieval"] == {"index": str(index_dir), "mode": "bm25", "k": len(first["passages"])}
    hits = Index.load(index_dir).search("Where is the lighthouse?", 2, "bm25")
    assert first["model_prompt"] == rag_prompt("Where is the lighthouse?", hits)  # exactly what the model saw
    for p in first["passages"]:
        assert f"[{p['id']}] {p['text']}" in first["model_prompt"]
    assert len(first["completions"]) == 2
