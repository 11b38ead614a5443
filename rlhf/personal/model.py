"""The personal reward model: a shared backbone and generic head, plus a low-rank part per user.

    r_u(x, y) = r₀(x, y) + e_uᵀ B φ(x, y)          (rlhf.algos.personal_rewards)

``r₀`` is the generic head on ``h``, the backbone's pooled state of (prompt, reply): an ordinary
reward model (:class:`~rlhf.models.reward_model.RewardModel`, MiniLM by default), which is what a
user without a fitted row gets. ``φ`` are the features the user part reads (``user_features``):

    pair          φ = h, the generic head's own input
    pair+reply    φ = [h, v, cos(u, v), log(1 + reply tokens)]: also the reply encoded on its own (v)
                  and the prompt on its own (u), L2-normalised as a sentence encoder reads them

A bi-encoder such as MiniLM was trained to compare separately encoded texts, and mean pooling
divides length out, so ``h`` alone hides two of the commonest ways users differ (how long, how on
topic); ``pair+reply`` gives them to the user part (benchmarks/RESULTS.md, Personalization).

The user part (``user_part``) is either ``lowrank``: B [D, F] learned jointly by gradient steps, a
user is a D-dimensional row (P-RLHF, PAL); or ``linear``: B = diag(s) fixed, one scale per feature
group (each group's differences get unit size, so 384 embedding dimensions do not outweigh one
length), and each user's row is the exact MAP logistic regression on their comparisons, with a
prior chosen by cross-validation on the training comparisons (rlhf.personal.update). Either way,
once the backbone is trained a user's row is a logistic regression on cached features, so a new
user is fitted from a few comparisons in milliseconds and nobody else's reward moves.

A personal reward model folder::

    backbone/            the backbone and generic head (a plain reward-model folder: rm:DIR/backbone)
    personal.json        dimension D, prior precision λ, user part and features, format version
    versions/v0001/      one user table: user_table.safetensors (B and every e_u) + users.json
    current.json         {"version": "v0003"}: the deployed table, replaced atomically
    versions.jsonl       every candidate version and its held-out accuracy, deployed or not
    features.sqlite      the backbone's pooled features of every (prompt, reply) seen, by text hash

Versions are immutable once written; deploying is the atomic rewrite of ``current.json``, which
readers (the chat server, scorers) notice by its modification time and swap in between requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.algos import personal_rewards
from rlhf.errors import ConfigError
from rlhf.data.context import clip_chars
from rlhf.models.reward_model import (Encoded, RewardEncoder, RewardModel, collate, load_reward_model, pad_id_of,
                                      pool_hidden)
from rlhf.utils.io import atomic_write_json, staging_dir

BACKBONE_DIR = "backbone"
CONFIG_FILE = "personal.json"
CURRENT_FILE = "current.json"
VERSION_LOG = "versions.jsonl"
TABLE_FILE = "user_table.safetensors"
USERS_FILE = "users.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Features: the backbone's pooled state of (prompt, reply)
# ---------------------------------------------------------------------------------------------

USER_FEATURES = ("pair", "pair+reply")


def pooled_features(rm: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Right-padded batch [B, T] → pooled backbone states [B, H]: what the generic head reads."""
    hidden = rm.backbone(**batch).last_hidden_state
    return pool_hidden(hidden, batch["attention_mask"], rm.spec.pooling)


def feature_width(rm: RewardModel, kind: str) -> int:
    """F, the width of φ: H for ``pair``, 2H + 2 for ``pair+reply``."""
    width = rm.head.in_features
    return width if kind == "pair" else 2 * width + 2


def feature_groups(rm: RewardModel, kind: str) -> list[slice]:
    """The columns of φ that share one prior scale: each embedding block, and each single statistic."""
    width = rm.head.in_features
    if kind == "pair":
        return [slice(0, width)]
    return [slice(0, width), slice(width, 2 * width), slice(2 * width, 2 * width + 1), slice(2 * width + 1, 2 * width + 2)]


def generic_reward(rm: RewardModel, feats: torch.Tensor) -> torch.Tensor:
    """r₀ [N] from features φ [N, F]: the generic head reads the first H columns (h)."""
    return rm.reward_from(feats[:, :rm.head.in_features].to(rm.head.weight.device)).float()


def text_key(prompt: str, reply: str) -> str:
    return hashlib.sha256(f"{prompt}\0{reply}".encode("utf-8")).hexdigest()


def backbone_fingerprint(rm: RewardModel) -> str:
    """A hash of every backbone weight: the features a cache holds are valid for exactly these weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in rm.backbone.state_dict().items():
        h.update(name.encode("utf-8"))
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Pooled features by text hash in SQLite, so refits never run the backbone over old texts again.

    Valid for one backbone: opened with another backbone's fingerprint it empties itself. Safe for
    several threads (one connection each) and processes (SQLite locking).
    """

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'backbone'").fetchone()
            if row is None or row[0] != fingerprint:
                conn.execute("DELETE FROM features")
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('backbone', ?)", (fingerprint,))

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        conn = self._conn()
        for s in range(0, len(keys), 500):
            chunk = keys[s:s + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in conn.execute(f"SELECT key, vec FROM features WHERE key IN ({marks})", chunk):
                out[key] = torch.frombuffer(bytearray(blob), dtype=torch.float32)
        return out

    def put(self, items: dict[str, torch.Tensor]) -> None:
        if not items:
            return
        with self._conn() as conn:  # one transaction
            conn.executemany("INSERT OR REPLACE INTO features (key, vec) VALUES (?, ?)",
                             [(k, v.detach().float().contiguous().numpy().tobytes()) for k, v in items.items()])

    def __len__(self) -> int:
        return self._conn().execute("SELECT count(*) FROM features").fetchone()[0]


class FeatureExtractor:
    """Features φ of (prompt, reply) texts through a frozen backbone (``kind``: see the module
    docstring), with an optional cache (opened with :func:`cache_fingerprint` of the same kind)."""

    def __init__(self, rm: RewardModel, tok, cache: FeatureCache | None = None, batch_size: int = 32, kind: str = "pair"):
        if kind not in USER_FEATURES:
            raise ConfigError(f"unknown user features {kind!r}; known: {', '.join(USER_FEATURES)}")
        self.rm, self.tok, self.encoder, self.pad_id = rm, tok, RewardEncoder(tok, rm.spec), pad_id_of(tok)
        self.cache, self.batch_size, self.kind = cache, batch_size, kind
        self._lock = threading.Lock()  # one forward at a time: torch modules are not re-entrant across threads

    def _pooled(self, items: list) -> torch.Tensor:
        """Encoded inputs → pooled states [N, H] in input order (batches of similar lengths)."""
        out = [None] * len(items)
        order = sorted(range(len(items)), key=lambda j: len(items[j].ids))
        device = next(self.rm.parameters()).device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = {k: v.to(device) for k, v in collate([items[j] for j in idx], self.pad_id).items()}
            for j, vec in zip(idx, pooled_features(self.rm, batch).float().cpu()):
                out[j] = vec.clone()
        return torch.stack(out)

    def _single(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each text encoded on its own, as a sentence encoder does: (L2-normalised pooled states [N, H], tokens [N])."""
        items, typed = [], self.rm.spec.prompt_format == "sentence_pair"  # token types where the backbone has them
        for t in texts:
            ids = self.tok(clip_chars(self.tok, t, self.rm.spec.max_length, keep="start"), truncation=True,
                           max_length=self.rm.spec.max_length)["input_ids"] or [self.pad_id]
            items.append(Encoded(ids, [0] * len(ids) if typed else None, False, False))
        return F.normalize(self._pooled(items), dim=-1), torch.tensor([len(i.ids) for i in items], dtype=torch.float32)

    def _compute(self, prompts: list[str], replies: list[str]) -> torch.Tensor:
        pair = self._pooled([self.encoder.encode(p, r) for p, r in zip(prompts, replies)])
        if self.kind == "pair":
            return pair
        # A prompt usually comes with several replies (a comparison's two, best-of-K's K): encode each once.
        distinct = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        u = self._single(list(distinct))[0][[distinct[prompt] for prompt in prompts]]
        v, n = self._single(replies)
        return torch.cat([pair, v, (u * v).sum(-1, keepdim=True), torch.log1p(n)[:, None]], dim=-1)

    @torch.no_grad()
    def __call__(self, prompts: list[str], replies: list[str]) -> torch.Tensor:
        """[N, H] float32, in input order."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        keys = [text_key(p, r) for p, r in zip(prompts, replies)]
        found = self.cache.get(sorted(set(keys))) if self.cache is not None else {}
        missing = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(), key=lambda kv: kv[1])
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            with self._lock:
                was_training = self.rm.training
                self.rm.eval()
                try:
                    vecs = self._compute([prompts[i] for _, i in missing], [replies[i] for _, i in missing])
                finally:
                    self.rm.train(was_training)
            fresh = {key: vec for (key, _), vec in zip(missing, vecs)}
            if self.cache is not None:
                self.cache.put(fresh)
        found.update(fresh)
        if not keys:
            return torch.zeros(0, feature_width(self.rm, self.kind))
        return torch.stack([found[k] for k in keys])


# ---------------------------------------------------------------------------------------------
# The user table and the model folder
# ---------------------------------------------------------------------------------------------

@dataclass
class UserTable:
    """B [D, H] shared by all users, and one row e_u [D] per known user (unknown users: zeros)."""

    basis: torch.Tensor
    names: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None  # [U, D]
    pairs: list[int] = field(default_factory=list)  # comparisons each row was fitted on

    def __post_init__(self) -> None:
        if self.embeddings is None:
            self.embeddings = torch.zeros(len(self.names), self.basis.shape[0])
        if len(self.names) != len(set(self.names)):
            raise ConfigError("a user table names a user twice")
        if self.embeddings.shape != (len(self.names), self.basis.shape[0]) or len(self.pairs) != len(self.names):
            raise ConfigError(f"user table shapes disagree: {len(self.names)} users, embeddings "
                              f"{tuple(self.embeddings.shape)}, basis {tuple(self.basis.shape)}")

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def embedding(self, user: str) -> torch.Tensor:
        """[D]: the user's row, or zeros (the generic reward) for a user the table does not know."""
        if user in self.names:
            return self.embeddings[self.names.index(user)]
        return torch.zeros(self.dim)

    def n_pairs(self, user: str) -> int:
        return self.pairs[self.names.index(user)] if user in self.names else 0

    def with_user(self, user: str, embedding: torch.Tensor, n_pairs: int) -> "UserTable":
        """A new table: ``user``'s row replaced (or added); every other row is copied unchanged."""
        names, emb, pairs = list(self.names), self.embeddings.clone(), list(self.pairs)
        if user in names:
            emb[names.index(user)] = embedding
            pairs[names.index(user)] = n_pairs
        else:
            names.append(user)
            emb = torch.cat([emb, embedding[None].to(emb.dtype)])
            pairs.append(n_pairs)
        return UserTable(self.basis, names, emb, pairs)

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        save_file({"basis": self.basis.contiguous(), "embeddings": self.embeddings.contiguous()}, str(folder / TABLE_FILE))
        atomic_write_json(folder / USERS_FILE, {"users": self.names, "pairs": self.pairs, **meta})

    @classmethod
    def load(cls, folder: Path) -> tuple["UserTable", dict[str, Any]]:
        from safetensors.torch import load_file

        if not (folder / TABLE_FILE).is_file() or not (folder / USERS_FILE).is_file():
            raise ConfigError(f"{folder} is not a user-table version ({TABLE_FILE} or {USERS_FILE} missing)")
        tensors = load_file(str(folder / TABLE_FILE))
        meta = json.loads((folder / USERS_FILE).read_text(encoding="utf-8"))
        return cls(tensors["basis"], list(meta.pop("users")), tensors["embeddings"], list(meta.pop("pairs"))), meta


@dataclass
class PersonalConfig:
    """What ``personal.json`` records: the user part's shape and prior, fixed for a model folder.
    (Folders written before ``user_part`` and ``user_features`` existed read as lowrank on pair.)"""

    dim: int
    prior_precision: float
    user_part: str = "lowrank"
    user_features: str = "pair"
    format_version: int = FORMAT_VERSION


def cache_fingerprint(rm: RewardModel, kind: str) -> str:
    """What a feature cache's entries are valid for: these backbone weights, this kind of features."""
    return backbone_fingerprint(rm) if kind == "pair" else f"{backbone_fingerprint(rm)}:{kind}"


class ModelDir:
    """The folder layout above: versions, the deployed pointer and the version log."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.backbone = self.root / BACKBONE_DIR
        self.versions = self.root / "versions"

    def config(self) -> PersonalConfig:
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{self.root} is not a personal reward model folder ({CONFIG_FILE} is missing; "
                              "train one with `rlhf personal train`)")
        raw = json.loads(path.read_text(encoding="utf-8"))
        try:
            cfg = PersonalConfig(**raw)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if cfg.format_version != FORMAT_VERSION:
            raise ConfigError(f"{path}: format version {cfg.format_version}; this build reads {FORMAT_VERSION}")
        return cfg

    def write_config(self, cfg: PersonalConfig) -> None:
        atomic_write_json(self.root / CONFIG_FILE, cfg.__dict__)

    def current(self) -> str | None:
        path = self.root / CURRENT_FILE
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))["version"]

    def current_stamp(self) -> tuple[int, int] | None:
        """(mtime, size) of current.json: cheap to poll, changes whenever a version is deployed."""
        try:
            st = os.stat(self.root / CURRENT_FILE)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def load(self, version: str | None = None) -> tuple[str, UserTable, dict[str, Any]]:
        version = version or self.current()
        if version is None:
            raise ConfigError(f"{self.root} has no deployed user table ({CURRENT_FILE} missing)")
        table, meta = UserTable.load(self.versions / version)
        return version, table, meta

    def write_version(self, table: UserTable, meta: dict[str, Any]) -> str:
        """Write a new immutable version (not deployed yet); returns its name."""
        self.versions.mkdir(parents=True, exist_ok=True)
        staged = staging_dir(self.versions / "new")
        try:
            table.save(staged, meta)
            for _ in range(1000):
                taken = [int(p.name[1:]) for p in self.versions.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]
                name = f"v{max(taken, default=0) + 1:04d}"
                try:  # rename never replaces a non-empty folder: two writers cannot take one name
                    os.rename(staged, self.versions / name)
                    return name
                except OSError:
                    if not (self.versions / name).exists():
                        raise
            raise ConfigError(f"could not reserve a version name in {self.versions}")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def deploy(self, version: str) -> None:
        if not (self.versions / version / TABLE_FILE).is_file():
            raise ConfigError(f"{self.versions / version} does not exist")
        atomic_write_json(self.root / CURRENT_FILE, {"version": version})

    def log(self, entry: dict[str, Any]) -> None:
        with open(self.root / VERSION_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_log(self) -> list[dict[str, Any]]:
        path = self.root / VERSION_LOG
        if not path.is_file():
            return []
        return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# Training-time model and scoring-time reward
# ---------------------------------------------------------------------------------------------

class PersonalRewardModel(nn.Module):
    """A reward model plus the user part, trained jointly (``rlhf personal train``)."""

    def __init__(self, rm: RewardModel, n_users: int, dim: int, seed: int, width: int | None = None):
        super().__init__()
        self.rm = rm
        width = width or rm.head.in_features  # F, the width of the features φ the user part reads
        g = torch.Generator().manual_seed(seed)
        # B random, e zero (as LoRA's A and B): every user starts at the generic reward and both get gradients.
        self.basis = nn.Parameter(torch.randn(dim, width, generator=g) / math.sqrt(width))
        self.embeddings = nn.Parameter(torch.zeros(n_users, dim))

    def forward(self, batch: dict[str, torch.Tensor], user_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """batch [B, T]; user_rows [B] (−1 = score generically) → (rewards [B], embeddings used [B, D])."""
        return self.from_features(pooled_features(self.rm, batch), user_rows)

    def from_features(self, feats: torch.Tensor, user_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from features φ [B, F] (a frozen backbone's, cached)."""
        emb = self.embeddings[user_rows.clamp(min=0)] * (user_rows >= 0).to(self.embeddings.dtype)[:, None]
        return personal_rewards(generic_reward(self.rm, feats), feats.float(), self.basis, emb), emb

    def table(self, names: list[str], pairs: list[int]) -> UserTable:
        return UserTable(self.basis.detach().cpu().clone(), list(names), self.embeddings.detach().cpu().clone(), list(pairs))


class PersonalReward:
    """Scores (prompt, reply) for a user with the deployed version, swapping in newer ones as they are deployed.

    ``refresh()`` is cheap (one stat of current.json) and is called before every score: a new
    version is loaded off to the side and swapped in with one assignment, so a request in flight
    keeps the table it started with and no request waits for a load.
    """

    def __init__(self, folder: str | Path, device: str = "cpu", use_cache: bool = True):
        self.dir = ModelDir(folder)
        self.config = self.dir.config()
        self.rm, self.tok, self.spec = load_reward_model(self.dir.backbone, device)
        kind = self.config.user_features
        cache = FeatureCache(self.dir.root / "features.sqlite", cache_fingerprint(self.rm, kind)) if use_cache else None
        self.features = FeatureExtractor(self.rm, self.tok, cache, kind=kind)
        self._state: tuple[tuple[int, int] | None, str, UserTable] | None = None
        self._load_lock = threading.Lock()
        self.refresh()

    def refresh(self) -> bool:
        """Load the deployed version if it changed; True when a new one was swapped in."""
        stamp = self.dir.current_stamp()
        if self._state is not None and self._state[0] == stamp:
            return False
        with self._load_lock:
            if self._state is not None and self._state[0] == stamp:
                return False
            version, table, _ = self.dir.load()
            self._state = (stamp, version, table)  # one assignment: readers see the old or the new state
        return True

    @property
    def version(self) -> str:
        return self._state[1]

    @property
    def table(self) -> UserTable:
        return self._state[2]

    def knows(self, user: str) -> bool:
        return user in self.table.names

    @torch.no_grad()
    def score(self, user: str | None, prompts: list[str], replies: list[str], table: UserTable | None = None) -> torch.Tensor:
        """Rewards [N] float32 for ``user`` (None or unknown: the generic reward)."""
        table = table or self.table
        feats = self.features(prompts, replies)
        generic = generic_reward(self.rm, feats).cpu()
        emb = (table.embedding(user) if user else torch.zeros(table.dim)).expand(len(prompts), -1)
        return personal_rewards(generic, feats, table.basis, emb)
