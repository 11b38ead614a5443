"""``rlhf personal ...``: the chat server, per-user rewards, adapters, the loop and scripted users.

    rlhf personal add-user ann --db labels.sqlite         # prints ann's chat link /chat/<token>
    rlhf personal serve --db labels.sqlite --reward runs/prm    # the labeling app + /chat
    rlhf personal train --feedback labels.sqlite --out runs/prm
    rlhf personal update --model runs/prm --feedback labels.sqlite
    rlhf personal loop --model runs/prm --feedback labels.sqlite --every 10
    rlhf personal adapter --model runs/prm --user ann
    rlhf personal simulate --server http://127.0.0.1:8000 --admin-token T --turns 50
    rlhf personal export --db labels.sqlite --out feedback.jsonl [--pairs]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.config import config_command, opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.personal.adapter import AdapterConfig, train_adapter
from rlhf.personal.loop import LoopConfig, run_loop
from rlhf.personal.policy import ChatPolicyConfig
from rlhf.personal.train import PersonalTrainConfig, train_personal


@click.group()
def personal() -> None:
    """Personalization: chat feedback, per-user rewards, reranking and adapters, the continuous loop."""


@dataclass
class PersonalServeConfig(ChatPolicyConfig):
    """Serve the labeling app with the chat page (/chat/<token>) and its API."""

    db: str = opt("labels.sqlite", help="Database of chat users and their choices (the labeling database; created if missing).")
    host: str = opt("127.0.0.1", help="Address to bind; use 0.0.0.0 only behind HTTPS, since links carry access tokens.")
    port: int = opt(8000, help="TCP port.")
    synchronous: str = opt("FULL", help="SQLite synchronous mode: FULL fsyncs every acknowledged choice.")
    access_log: bool = opt(True, help="Log every request line (chat tokens in /chat/<token> are redacted).")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.port < 65536:
            raise ConfigError("--port must be in 0..65535")


@config_command(PersonalServeConfig, name="serve")
def serve_cmd(cfg: PersonalServeConfig) -> None:
    """Serve the chat page and API (and the labeling pages) until Ctrl-C."""
    from rlhf.engine.runtime import start
    from rlhf.feedback.server import default_allowed_hosts, serve
    from rlhf.feedback.store import open_store
    from rlhf.personal.api import create_chat_app, redact_chat_tokens
    from rlhf.personal.policy import ChatPolicy

    rt = start(cfg.engine)
    store = open_store(cfg.db, synchronous=cfg.synchronous)
    chat = ChatPolicy(cfg, rt.device, rt.dtype)
    redact_chat_tokens()
    click.echo(f"chat server on http://{cfg.host}:{cfg.port} (database {cfg.db}; replies: "
               f"{'reranked by ' + cfg.reward if cfg.reward else 'plain samples'})", err=True)
    serve(store, cfg.host, cfg.port, access_log=cfg.access_log, app=create_chat_app(store, chat, default_allowed_hosts(cfg.host)))


@personal.command("add-user")
@click.argument("name")
@click.option("--db", default="labels.sqlite", show_default=True, help="The chat server's database.")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Address people use to reach the server.")
def add_user_cmd(name: str, db: str, url: str) -> None:
    """Create chat user NAME and print their personal chat link (token inside; shown once)."""
    from rlhf.feedback.store import Conflict, Invalid, open_store
    from rlhf.personal.api import chat_link
    from rlhf.personal.store import PersonalStore

    try:
        user, token = PersonalStore(open_store(db)).add_user(name)
    except (Conflict, Invalid) as exc:
        raise ConfigError(str(exc)) from None
    click.echo(f"chat user {user.name}: send this link to them only; it is shown once", err=True)
    click.echo(chat_link(url, token))


@personal.command("export")
@click.option("--db", default="labels.sqlite", show_default=True, help="The chat server's database.")
@click.option("--out", "-o", required=True, help="JSON Lines file to write (atomically).")
@click.option("--user", default=None, help="Only this user's feedback.")
@click.option("--pairs", is_flag=True, help="Write the preference pairs the feedback implies (with a user field) "
                                            "instead of feedback records: `rlhf reward train` takes them.")
def export_cmd(db: str, out: str, user: str | None, pairs: bool) -> None:
    """Export chat feedback records (or their pairs)."""
    from rlhf.data.io import write_records
    from rlhf.feedback.store import open_store
    from rlhf.personal.store import PersonalStore

    if not Path(db).is_file():
        raise ConfigError(f"{db}: no such database")
    records = PersonalStore(open_store(db)).feedback(user)
    rows = [p for r in records for p in r.pairs()] if pairs else records
    write_records(out, rows)
    click.echo(json.dumps({"records": len(records), "written": len(rows), "kind": "pairs" if pairs else "feedback", "out": out}))


@config_command(PersonalTrainConfig, name="train")
def train_cmd(cfg: PersonalTrainConfig) -> None:
    """Train the personal reward model on everyone's feedback; prints a JSON summary.

    Runs on several processes under ``accelerate launch --num_processes N -m rlhf personal train ...``
    (docs/scaling.md); the main process prints the summary."""
    summary = train_personal(cfg)
    if summary is not None:
        click.echo(json.dumps(summary))


@dataclass
class UpdateConfig:
    """Refit users' parts from their feedback in seconds (backbone fixed, cached features); deploy what is not worse."""

    model: str = opt(help="Personal reward model folder.")
    feedback: str = opt(help="Feedback: the chat database (.sqlite) or a feedback JSONL file.")
    users: list[str] = opt(factory=list, flag="user", help="Users to refit (default: everyone whose comparison count changed).")
    holdout: float = opt(0.2, help="Share of each user's most recent feedback held out to judge the candidate.")
    gate: bool = opt(True, help="Deploy a candidate only when it is not worse on the held-out choices.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the backbone runs for replies it has no cached features "
                                                          "of (device, threads).")


@config_command(UpdateConfig, name="update")
def update_cmd(cfg: UpdateConfig) -> None:
    """Fit new or changed users from their comparisons without retraining the backbone."""
    from rlhf.engine.runtime import start
    from rlhf.personal.model import PersonalReward
    from rlhf.personal.records import feedback_pairs, read_feedback
    from rlhf.personal.update import refit_user

    rt = start(cfg.engine)
    reward = PersonalReward(cfg.model, str(rt.device))
    by_user = feedback_pairs(read_feedback(cfg.feedback))
    users = cfg.users or [u for u, ps in by_user.items() if len(ps) != reward.table.n_pairs(u)]
    for user in users:
        if user not in by_user:
            raise ConfigError(f"{cfg.feedback} holds no feedback from user {user!r}")
        r = refit_user(reward, user, by_user[user], cfg.holdout, cfg.gate)
        click.echo(json.dumps({k: getattr(r, k) for k in ("user", "version", "deployed", "reason", "train_pairs",
                                                           "heldout_pairs", "accuracy_deployed", "accuracy_candidate",
                                                           "fit_seconds")}))


@config_command(LoopConfig, name="loop")
def loop_cmd(cfg: LoopConfig) -> None:
    """Refit users as their feedback arrives; every candidate's held-out accuracy goes to MODEL/versions.jsonl."""
    run_loop(cfg)


@config_command(AdapterConfig, name="adapter")
def adapter_cmd(cfg: AdapterConfig) -> None:
    """Train a user's LoRA adapter with PPO against their reward; the chat server uses it from their next turn."""
    click.echo(json.dumps(train_adapter(cfg)))


@dataclass
class SimulateConfig:
    """Scripted chat users with conflicting tastes, talking to a running chat server over HTTP."""

    admin_token: str = opt(help="Admin token (`rlhf label add-admin`): creates one chat user per taste.")
    server: str = opt("http://127.0.0.1:8000", help="Base URL of a running `rlhf personal serve`.")
    tastes: list[str] = opt(factory=lambda: ["concise", "detailed", "polite", "blunt", "focused", "playful"],
                            flag="taste", help="Tastes, one user each: concise, detailed, polite, blunt, focused, "
                                               "playful, cautious, direct.")
    turns: int = opt(20, help="Questions each user asks (and answers).")
    noise: float = opt(0.25, help="Standard deviation of the Gaussian noise on each utility (1 ≈ one typical difference).")
    prompts: str = opt("", help="Prompts file the users draw questions from; empty = the shipped training prompts.")
    name_prefix: str = opt("sim-", help="Users are named PREFIX + taste.")
    both_bad_below: float | None = opt(None, help="Mark both replies bad when neither reaches this utility (unset = never).")
    edit_rate: float = opt(0.0, help="How often a user saves an edited reply (their preferred mix of the two).")
    seed: int = opt(0, help="Random seed for prompts and noise.")


@config_command(SimulateConfig, name="simulate")
def simulate_cmd(cfg: SimulateConfig) -> None:
    """Run scripted users against the chat API; prints one JSON line per user."""
    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.models.loading import shipped_prompts
    from rlhf.personal.users import simulate_users

    prompts = [p.prompt for p in read_records(cfg.prompts or shipped_prompts("train"), PromptRecord)]
    for run in simulate_users(cfg.server, cfg.admin_token, cfg.tastes, prompts, cfg.turns, cfg.noise, cfg.seed,
                              cfg.name_prefix, cfg.both_bad_below, cfg.edit_rate):
        click.echo(json.dumps(run.__dict__))


for _cmd in (serve_cmd, train_cmd, update_cmd, loop_cmd, adapter_cmd, simulate_cmd):
    personal.add_command(_cmd)
