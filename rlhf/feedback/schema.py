"""The labeling store's tables, in the SQL both engines accept ({pk} {ref} {real} are filled in per
engine by the store), the migration from version 1, and the recount that checks the kept counters
(rlhf/feedback/store.py says what each counter is for)."""

SCHEMA_VERSION = 2

# Version 1, as the first release created it; {pk} {ref} {real} are filled in per engine.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS campaigns (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    criterion TEXT NOT NULL,
    instructions TEXT NOT NULL,
    labels_per_item INTEGER NOT NULL,
    created_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id {pk},
    campaign_id {ref} NOT NULL REFERENCES campaigns(id),
    position {real} NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,
    gold_ranking TEXT,
    gold_ties TEXT,
    UNIQUE (campaign_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS users (
    id {pk},
    campaign_id {ref} REFERENCES campaigns(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('labeler', 'admin')),
    token_hash TEXT NOT NULL UNIQUE,
    created_at {real} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS users_unique_name ON users (role, coalesce(campaign_id, 0), name);
CREATE TABLE IF NOT EXISTS assignments (
    id {pk},
    item_id {ref} NOT NULL REFERENCES items(id),
    user_id {ref} NOT NULL REFERENCES users(id),
    shown_order TEXT NOT NULL,
    served_at {real} NOT NULL,
    UNIQUE (user_id, item_id)
);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments (item_id);
CREATE TABLE IF NOT EXISTS labels (
    assignment_id {ref} PRIMARY KEY REFERENCES assignments(id),
    submission_id TEXT NOT NULL,
    ranking TEXT NOT NULL,
    ties TEXT NOT NULL,
    skipped INTEGER NOT NULL,
    skip_reason TEXT,
    submitted_at {real} NOT NULL
)
"""

# Version 2: the counters that spare next-item and progress a scan, and revocable links. The
# UPDATEs fill the counters from a version-1 database's rows (:fresh = now - claim timeout).
MIGRATE_V2 = """
ALTER TABLE campaigns ADD COLUMN open_items INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN taken INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN is_full INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN done INTEGER NOT NULL DEFAULT 0;
ALTER TABLE assignments ADD COLUMN counted INTEGER NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN revoked_at {real};
ALTER TABLE users ADD COLUMN n_done INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN n_skipped INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN n_open INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN n_on_open_items INTEGER NOT NULL DEFAULT 0;
UPDATE assignments SET done = CASE WHEN EXISTS (SELECT 1 FROM labels l WHERE l.assignment_id = assignments.id)
    THEN 1 ELSE 0 END;
UPDATE assignments SET counted = CASE
    WHEN done = 1 THEN (SELECT CASE WHEN l.skipped = 0 THEN 1 ELSE 0 END FROM labels l WHERE l.assignment_id = assignments.id)
    WHEN served_at > :fresh THEN 1 ELSE 0 END;
UPDATE items SET taken = (SELECT count(*) FROM assignments a WHERE a.item_id = items.id AND a.counted = 1);
UPDATE items SET is_full = CASE WHEN gold_ranking IS NULL AND taken >= (SELECT c.labels_per_item FROM campaigns c
    WHERE c.id = items.campaign_id) THEN 1 ELSE 0 END;
UPDATE campaigns SET open_items = (SELECT count(*) FROM items i WHERE i.campaign_id = campaigns.id AND i.is_full = 0);
UPDATE users SET
    n_done = (SELECT count(*) FROM assignments a WHERE a.user_id = users.id AND a.done = 1),
    n_skipped = (SELECT count(*) FROM assignments a JOIN labels l ON l.assignment_id = a.id
                 WHERE a.user_id = users.id AND l.skipped = 1),
    n_open = (SELECT count(*) FROM assignments a WHERE a.user_id = users.id AND a.done = 0),
    n_on_open_items = (SELECT count(*) FROM assignments a JOIN items i ON i.id = a.item_id
                       WHERE a.user_id = users.id AND i.is_full = 0);
CREATE INDEX IF NOT EXISTS items_open ON items (campaign_id, is_full, position, id);
CREATE INDEX IF NOT EXISTS assignments_user ON assignments (user_id, done);
CREATE INDEX IF NOT EXISTS assignments_open_claims ON assignments (served_at) WHERE done = 0 AND counted = 1
"""

# Each kept counter against a recount of the rows it counts: (key, kept, counted) per row.
RECOUNT = {
    "items.taken": "SELECT i.id, i.taken, (SELECT count(*) FROM assignments a WHERE a.item_id = i.id AND a.counted = 1) "
                   "FROM items i",
    "items.is_full": "SELECT i.id, i.is_full, CASE WHEN i.gold_ranking IS NULL AND i.taken >= c.labels_per_item "
                     "THEN 1 ELSE 0 END FROM items i JOIN campaigns c ON c.id = i.campaign_id",
    "campaigns.open_items": "SELECT c.id, c.open_items, (SELECT count(*) FROM items i WHERE i.campaign_id = c.id "
                            "AND i.is_full = 0) FROM campaigns c",
    "users.n_done": "SELECT u.id, u.n_done, (SELECT count(*) FROM assignments a WHERE a.user_id = u.id AND a.done = 1) "
                    "FROM users u",
    "users.n_skipped": "SELECT u.id, u.n_skipped, (SELECT count(*) FROM assignments a JOIN labels l ON "
                       "l.assignment_id = a.id WHERE a.user_id = u.id AND l.skipped = 1) FROM users u",
    "users.n_open": "SELECT u.id, u.n_open, (SELECT count(*) FROM assignments a WHERE a.user_id = u.id AND a.done = 0) "
                    "FROM users u",
    "users.n_on_open_items": "SELECT u.id, u.n_on_open_items, (SELECT count(*) FROM assignments a JOIN items i ON "
                             "i.id = a.item_id WHERE a.user_id = u.id AND i.is_full = 0) FROM users u",
    "assignments.done": "SELECT a.id, a.done, CASE WHEN l.assignment_id IS NULL THEN 0 ELSE 1 END FROM assignments a "
                        "LEFT JOIN labels l ON l.assignment_id = a.id",
    "assignments.counted (labelled)": "SELECT a.id, a.counted, 1 - l.skipped FROM assignments a JOIN labels l "
                                      "ON l.assignment_id = a.id",
}
