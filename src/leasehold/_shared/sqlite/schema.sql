-- leasehold SQLite schema (created idempotently on first use).
-- lh_seq:    one row; the fence sequence for every name (strictly increasing, so
--            fences per name increase without keeping a row per name forever).
-- lh_meta:   boot id of the host clock the expiries were written with.
-- lh_holder: live grants; expires is on the host's boot-time clock (seconds).
-- lh_record: small versioned values changed by compare-and-set; version comes
--            from lh_seq, expires (boot clock) NULL means never.
-- lh_waiter: FIFO wait queue per name; seq orders arrivals; wake is the waiter's
--            same-host wake-up socket address (NULL: it polls); ttl, lim, owner,
--            host, pid are its latest acquire request, which a release uses to make
--            it a holder (hand-over). Older stores get these columns by ALTER TABLE
--            (see WAITER_COLUMNS in leasehold/_shared/sqlite/tx.py); their rows lack them (NULL) and
--            are only woken.
CREATE TABLE IF NOT EXISTS lh_seq (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO lh_seq (id, value) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS lh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS lh_holder (
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    fence INTEGER NOT NULL,
    lim INTEGER NOT NULL,
    acquired REAL NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (name, token)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lh_holder_expires ON lh_holder (expires);
CREATE TABLE IF NOT EXISTS lh_waiter (
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires REAL NOT NULL,
    wake TEXT,
    ttl REAL,
    lim INTEGER,
    owner TEXT,
    host TEXT,
    pid INTEGER,
    PRIMARY KEY (name, token)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lh_waiter_seq ON lh_waiter (name, seq);
CREATE TABLE IF NOT EXISTS lh_record (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    expires REAL
) WITHOUT ROWID;
