-- The store schema version 1, as fedrec-coordinator wrote it before issue 10 (a test fixture for the upgrade).
CREATE TABLE rounds (
    round              INTEGER PRIMARY KEY CHECK (round >= 0),
    -- The model version after the round (unchanged when it was abandoned).
    model_version      INTEGER NOT NULL CHECK (model_version >= 0),
    -- When the outcome was recorded (committed or abandoned), ms since the Unix epoch.
    committed_at_ms    INTEGER NOT NULL,
    n_checked_in       INTEGER NOT NULL CHECK (n_checked_in >= 0),
    n_selected         INTEGER NOT NULL CHECK (n_selected >= 0),
    n_reported         INTEGER NOT NULL CHECK (n_reported >= 0),
    n_dropped          INTEGER NOT NULL CHECK (n_dropped >= 0),
    -- Noise standard deviation per coordinate (0 without noise or when abandoned).
    noise_std          REAL NOT NULL,
    clip_norm          REAL NOT NULL,
    -- Noised fraction of updates within the clip norm (adaptive clipping only).
    unclipped_fraction REAL,
    outcome            TEXT NOT NULL CHECK (outcome IN ('committed', 'abandoned')),
    abandon_reason     TEXT CHECK ((outcome = 'abandoned') = (abandon_reason IS NOT NULL))
) STRICT;

CREATE TABLE checkpoints (
    model_version INTEGER PRIMARY KEY CHECK (model_version >= 0),
    -- The round whose commit produced this model; NULL for the initial model.
    round         INTEGER REFERENCES rounds (round),
    saved_at_ms   INTEGER NOT NULL,
    next_round    INTEGER NOT NULL CHECK (next_round >= 0),
    -- The clip norm of the next round (adaptive clipping moves it).
    clip_norm     REAL NOT NULL,
    n_items       INTEGER NOT NULL,
    dim           INTEGER NOT NULL,
    n_segments    INTEGER NOT NULL,
    -- Float arrays: little-endian f32, row-major. item_factors is n_items x dim.
    item_factors  BLOB NOT NULL,
    item_bias     BLOB NOT NULL,
    global_mean   REAL NOT NULL,
    -- n_segments x dim.
    centroids     BLOB NOT NULL,
    -- The server optimizer: 'sgd' (lr, momentum) or 'adam' (lr, beta1, beta2, eps).
    optimizer     TEXT NOT NULL CHECK (optimizer IN ('sgd', 'adam')),
    lr            REAL NOT NULL,
    momentum      REAL,
    beta1         REAL,
    beta2         REAL,
    eps           REAL,
    -- SGD momentum or Adam first moment, one per trainable parameter.
    first_moment  BLOB NOT NULL,
    -- Adam second moment (empty for SGD).
    second_moment BLOB NOT NULL,
    step          INTEGER NOT NULL CHECK (step >= 0),
    -- Decayed member count of each centroid (empty before the first round).
    centroid_mass BLOB NOT NULL
) STRICT;

-- The privacy ledger: one charge per committed noisy round. Append-only, never pruned.
CREATE TABLE ledger (
    round            INTEGER PRIMARY KEY CHECK (round >= 0),
    q                REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    -- Noise on the adaptive-clipping bits; NULL without adaptive clipping.
    clip_bits_noise  REAL
) STRICT;

-- What happened, when. Counts only: never the ids of the devices a round selected.
CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    event  TEXT NOT NULL,
    detail TEXT NOT NULL
) STRICT;

CREATE TABLE devices (
    -- The device id's 64 bits as a signed integer (ids above 2^63 - 1 show as negative).
    device_id      INTEGER PRIMARY KEY,
    enrolled_at_ms INTEGER NOT NULL,
    -- NULL while the device is enrolled.
    revoked_at_ms  INTEGER,
    label          TEXT
) STRICT;
