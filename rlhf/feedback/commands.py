"""``rlhf label``: run a labeling campaign with people (or scripted labelers) and export rankings.

    rlhf label import --db labels.sqlite --completions c.jsonl --criterion helpfulness \\
        --instructions instructions.md --labels-per-item 3
    rlhf label add-admin alice           # prints the admin link
    rlhf label add-labeler ann           # prints ann's personal link
    rlhf label revoke ann / rotate ann   # ann's link stops working (rotate prints a new one)
    rlhf label serve --db labels.sqlite  # http://127.0.0.1:8000
    rlhf label export --db labels.sqlite --out rankings.jsonl [--consensus]
    rlhf label simulate --server http://127.0.0.1:8000 --admin-token T --scorer length --noise 2
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from rlhf.config import config_command, opt
from rlhf.errors import ConfigError


@click.group()
def label() -> None:
    """The labeling web app: campaigns, labelers, export, simulate."""


@dataclass
class ServeConfig:
    """Serve the labeling pages and API."""

    db: str = opt("labels.sqlite", help="Campaign database: a SQLite file (created if missing) or a postgresql:// URL.")
    host: str = opt("127.0.0.1", help="Address to bind. The default is reachable from this machine only; "
                                      "use 0.0.0.0 only behind HTTPS, since links carry access tokens.")
    port: int = opt(8000, help="TCP port.")
    synchronous: str = opt("FULL", help="SQLite synchronous mode: FULL fsyncs every acknowledged label; NORMAL "
                                        "survives a killed server but may lose the last labels on power loss.")
    claim_timeout: float = opt(1800.0, help="Seconds an unanswered item stays reserved for the labeler who opened "
                                            "it before others may take it.")
    access_log: bool = opt(True, help="Log every request line.")
    allow_host: list[str] = opt(help="Another host name the server answers to (repeat). On loopback it answers only "
                                     "to 127.0.0.1, localhost and ::1 otherwise (against DNS rebinding).", factory=list)

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError("--port must be in 0..65535")
        if self.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("--synchronous must be FULL, NORMAL or EXTRA")
        if self.claim_timeout <= 0:
            raise ConfigError("--claim-timeout must be positive")


@config_command(ServeConfig, name="serve")
def serve_cmd(cfg: ServeConfig) -> None:
    """Serve labeler pages (/label) and the admin page (/admin) until Ctrl-C."""
    from rlhf.feedback.server import serve
    from rlhf.feedback.store import open_store

    store = open_store(cfg.db, synchronous=cfg.synchronous, claim_timeout_s=cfg.claim_timeout)
    if not store.campaigns():
        click.echo(f"note: {cfg.db} has no campaign yet; run `rlhf label import` (the server picks it up live)", err=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {cfg.host}: anyone who can reach this port and holds a link can label; "
                   "put HTTPS in front of it", err=True)
    click.echo(f"labeling server on http://{cfg.host}:{cfg.port} (database {cfg.db})", err=True)
    serve(store, cfg.host, cfg.port, access_log=cfg.access_log, allow_hosts=cfg.allow_host)


@dataclass
class ImportConfig:
    """Create a campaign: every prompt with its K completions becomes one item."""

    completions: str = opt(help="Completions file (JSON Lines: prompt_id, prompt, completions); records with "
                                "gold_ranking become gold items.")
    criterion: str = opt(help="What labelers rank by, e.g. helpfulness or harmlessness.")
    db: str = opt("labels.sqlite", help="Campaign database: a SQLite file (created if missing) or a postgresql:// URL.")
    instructions: str | None = opt(None, help="Markdown or text file shown to labelers first (default: a short "
                                              "text naming the criterion).")
    labels_per_item: int = opt(3, help="How many different labelers rank each item (N).")
    gold: str | None = opt(None, help="Rankings file of attention-check items with a known order (every labeler "
                                      "ranks each once).")
    name: str | None = opt(None, help="Campaign name (default: the completions file's name).")

    def validate(self) -> None:
        if self.labels_per_item < 1:
            raise ConfigError("--labels-per-item must be at least 1")


@config_command(ImportConfig, name="import")
def import_cmd(cfg: ImportConfig) -> None:
    """Import a completions file as a labeling campaign."""
    from rlhf.feedback.campaign import import_campaign
    from rlhf.feedback.store import open_store

    store = open_store(cfg.db)
    camp = import_campaign(store, cfg.completions, cfg.criterion, cfg.labels_per_item, cfg.instructions, cfg.gold, cfg.name)
    counts = store.counts(camp.id)
    click.echo(json.dumps({"campaign": camp.name, "criterion": camp.criterion, "items": counts["items"] - counts["gold_items"],
                           "gold_items": counts["gold_items"], "labels_per_item": camp.labels_per_item, "db": cfg.db}))


def _add_user(db: str, name: str, role: str, campaign: str | None, url: str) -> None:
    from rlhf.feedback.server import admin_link, labeler_link
    from rlhf.feedback.store import Conflict, Invalid, open_store

    store = open_store(db)
    try:
        camp_id = store.find_campaign(campaign).id if role == "labeler" else None
        user, token = store.add_user(name, role, camp_id)
    except (Conflict, Invalid) as exc:
        raise ConfigError(str(exc)) from None
    link = labeler_link(url, token) if role == "labeler" else admin_link(url, token)
    click.echo(f"{role} {user.name}: send this link to them only; it is shown once", err=True)
    click.echo(link)


_db_option = click.option("--db", default="labels.sqlite", show_default=True, help="Campaign database: a SQLite file or a postgresql:// URL.")
_url_option = click.option("--url", default="http://127.0.0.1:8000", show_default=True,
                           help="Address people use to reach the server, for the printed link.")


@label.command("add-labeler")
@click.argument("name")
@_db_option
@click.option("--campaign", default=None, help="Campaign name (needed only when the database holds several).")
@_url_option
def add_labeler_cmd(name: str, db: str, campaign: str | None, url: str) -> None:
    """Create labeler NAME and print their personal link (token inside; shown once)."""
    _add_user(db, name, "labeler", campaign, url)


@label.command("add-admin")
@click.argument("name")
@_db_option
@_url_option
def add_admin_cmd(name: str, db: str, url: str) -> None:
    """Create admin NAME and print the admin page link (progress, agreement, export)."""
    _add_user(db, name, "admin", None, url)


def _labeler(db: str, name: str, campaign: str | None):
    from rlhf.feedback.store import NotFound, open_store

    store = open_store(db)
    camp = store.find_campaign(campaign)
    try:
        return store, camp, store.find_labeler(name, camp.id)
    except NotFound as exc:
        raise ConfigError(f"{exc} ({camp.name})") from None


@label.command("revoke")
@click.argument("name")
@_db_option
@click.option("--campaign", default=None, help="Campaign name (needed only when the database holds several).")
def revoke_cmd(name: str, db: str, campaign: str | None) -> None:
    """Revoke labeler NAME's link at once; their unanswered items go back to the pool, their labels stay."""
    store, camp, user = _labeler(db, name, campaign)
    released = store.revoke(user)
    click.echo(json.dumps({"labeler": user.name, "campaign": camp.name, "revoked": True, "items_released": released}))


@label.command("rotate")
@click.argument("name")
@_db_option
@click.option("--campaign", default=None, help="Campaign name (needed only when the database holds several).")
@_url_option
def rotate_cmd(name: str, db: str, campaign: str | None, url: str) -> None:
    """Give labeler NAME a new link (also after a revoke); the old one stops working at once."""
    from rlhf.feedback.server import labeler_link

    store, _, user = _labeler(db, name, campaign)
    token = store.rotate_token(user)
    click.echo(f"labeler {user.name}: the old link no longer works; send this one to them only", err=True)
    click.echo(labeler_link(url, token))


@dataclass
class ExportConfig:
    """Write the rankings contract from a campaign."""

    out: str = opt(help="Rankings file to write (JSON Lines); written atomically.", short="-o")
    db: str = opt("labels.sqlite", help="Campaign database: a SQLite file or a postgresql:// URL.")
    campaign: str | None = opt(None, help="Campaign name (needed only when the database holds several).")
    consensus: bool = opt(False, help="One Borda-consensus ranking per item instead of one record per labeler per item.")


@config_command(ExportConfig, name="export")
def export_cmd(cfg: ExportConfig) -> None:
    """Export rankings in original completion order (the shuffle each labeler saw is undone)."""
    from pathlib import Path

    from rlhf.data.io import write_records
    from rlhf.feedback.export import consensus_records, label_records
    from rlhf.feedback.store import open_store

    if "://" not in cfg.db and not Path(cfg.db).is_file():
        raise ConfigError(f"{cfg.db}: no such campaign database")
    store = open_store(cfg.db)
    camp = store.find_campaign(cfg.campaign)
    records = consensus_records(store, camp) if cfg.consensus else label_records(store, camp)
    write_records(cfg.out, records)
    click.echo(json.dumps({"campaign": camp.name, "records": len(records),
                           "skipped": sum(1 for r in records if r.get("skipped")), "consensus": cfg.consensus,
                           "out": cfg.out}))


@label.command("status")
@_db_option
@click.option("--campaign", default=None, help="Campaign name (needed only when the database holds several).")
def status_cmd(db: str, campaign: str | None) -> None:
    """Print the admin page's figures as JSON: progress, agreement, gold checks."""
    from rlhf.feedback.export import campaign_summary
    from rlhf.feedback.store import open_store

    store = open_store(db)
    click.echo(json.dumps(campaign_summary(store, store.find_campaign(campaign)), indent=2))


@dataclass
class SimulateConfig:
    """Scripted labelers: rank by a scorer plus Gaussian (Thurstone) noise, through the HTTP API."""

    server: str = opt("http://127.0.0.1:8000", help="Base URL of a running labeling server.")
    scorer: str = opt("length", help="Scorer spec the labelers rank by (e.g. length, sentiment, rm:<dir>).")
    noise: float = opt(0.0, help="Standard deviation of the Gaussian noise added to each score, in the scorer's units.")
    admin_token: str | None = opt(None, help="Admin token: create --labelers new scripted labelers and run them all.")
    token: str | None = opt(None, help="One existing labeler's token: label as that labeler (instead of --admin-token).")
    labelers: int = opt(3, help="How many scripted labelers to create with --admin-token.")
    name_prefix: str = opt("sim", help="New labelers are named PREFIX-1, PREFIX-2, ...")
    campaign: str | None = opt(None, help="Campaign name (needed only when the server holds several).")
    tie_margin: float = opt(0.0, help="Mark neighbours tied when their noisy scores differ by at most this.")
    skip_rate: float = opt(0.0, help="Probability of skipping an item (with a reason) instead of ranking it.")
    max_items: int = opt(0, help="Stop each labeler after this many items (0 = until nothing is left).")
    seed: int = opt(0, help="Random seed for the noise.")

    def validate(self) -> None:
        if (self.admin_token is None) == (self.token is None):
            raise ConfigError("give exactly one of --admin-token (create scripted labelers) or --token (one labeler)")
        if self.noise < 0 or self.tie_margin < 0:
            raise ConfigError("--noise and --tie-margin must be 0 or positive")
        if not 0 <= self.skip_rate <= 1:
            raise ConfigError("--skip-rate must be in [0, 1]")
        if self.labelers < 1 or self.max_items < 0:
            raise ConfigError("--labelers must be at least 1 and --max-items 0 or more")


@config_command(SimulateConfig, name="simulate")
def simulate_cmd(cfg: SimulateConfig) -> None:
    """Label a campaign with scripted labelers, the way people would through the web page."""
    from rlhf.feedback.simulate import label_as, simulate_labelers
    from rlhf.judges.base import load_scorer

    scorer = load_scorer(cfg.scorer)
    max_items = cfg.max_items or None
    if cfg.token is not None:
        runs = [label_as(cfg.server, cfg.token, scorer, cfg.noise, cfg.seed, cfg.tie_margin, cfg.skip_rate, max_items)]
    else:
        runs = simulate_labelers(cfg.server, cfg.admin_token, scorer, cfg.labelers, cfg.noise, cfg.seed, cfg.campaign,
                                 cfg.name_prefix, cfg.tie_margin, cfg.skip_rate, max_items)
    for r in runs:
        click.echo(json.dumps({"labeler": r.name, "ranked": r.submitted, "skipped": r.skipped, "retries": r.retries}))
    sys.stdout.flush()


label.add_command(serve_cmd)
label.add_command(import_cmd)
label.add_command(export_cmd)
label.add_command(simulate_cmd)
