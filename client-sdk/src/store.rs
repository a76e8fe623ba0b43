//! The sealed local store: interactions, user vector, cached model, consent — AEAD at rest, atomic writes, schema versions, one process per folder, rollback detection.
//!
//! Everything the SDK keeps about its user lives in one file, [`STORE_FILE`], in the SDK's
//! folder. The file is:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "FEDRECST"
//! 8       2     format version, u16 LE (1)
//! 10      1     AEAD algorithm (1 = ChaCha20-Poly1305)
//! 11      1     reserved, 0
//! 12      12    nonce, random per write (ring SystemRandom)
//! 24      ..    ciphertext of the payload, then the 16-byte tag
//! ```
//!
//! The 24 header bytes are the AEAD's associated data, so a changed header fails
//! authentication like a changed ciphertext. The key is the host's 32 bytes (from the
//! platform keystore). An AEAD cannot tell a wrong key from a tampered file: both give
//! [`StoreError::WrongKeyOrCorrupt`].
//!
//! The payload is a `u32` LE schema version followed by the body of that version, all
//! little-endian (see [`encode`]). Reading dispatches on the version through [`migrate`],
//! so an old file opens under a newer SDK and a newer file gives
//! [`StoreError::UnsupportedVersion`] instead of garbage.
//!
//! Writes are atomic: the sealed bytes go to [`TEMP_FILE`] in the same folder, are fsynced,
//! renamed over the store and the folder is fsynced. A failed write leaves the previous file
//! intact. Reads are bounded by a size cap before anything is allocated for the contents.
//!
//! # Files and modes
//!
//! Besides the store, the folder holds [`LOCK_FILE`] (the lock, below), [`GENERATION_FILE`]
//! (the rollback counter, below) and, briefly, their temporary files. On Unix every file the
//! store creates is `0600` and a folder it creates is `0700`; a lock file found with a wider
//! mode is narrowed to `0600`, a store with a wider mode is replaced by a `0600` one at the
//! next write. Each file is checked with `symlink_metadata` before it is opened: a symlink,
//! FIFO, socket, device or folder at one of these names is refused
//! ([`StoreError::NotAFile`]) instead of followed or blocked on.
//!
//! # One process per folder
//!
//! [`Store::new`] takes an exclusive OS lock (`File::try_lock`: `flock` on Unix,
//! `LockFileEx` on Windows) on [`LOCK_FILE`] and holds it until the [`Store`] is dropped.
//! A second store on the same folder, in this process or another, gets
//! [`StoreError::Locked`] at once instead of silently overwriting the first one's writes.
//! Where the filesystem does not support locks, the store runs unlocked.
//!
//! # Rollback detection
//!
//! Every write carries a generation, one more than the last, inside the sealed payload
//! (schema 2), and after the store is renamed into place the same number is written, sealed
//! under the same key, to [`GENERATION_FILE`]. Opening refuses a store whose sealed generation
//! is below the counter ([`StoreError::Rollback`]): an older copy of the store file put back
//! over a newer one (which could, for example, restore a withdrawn consent). A store of
//! generation 2 or more with no counter beside it is refused the same way. The counter is
//! written after the store, so a crash between the two leaves a store *newer* than the
//! counter, which opens (and the counter catches up).
//!
//! The limit: the counter lives in the same folder. Whoever can replace the whole folder
//! (the store and the counter together, e.g. from an old backup, or delete both and put back
//! an old store of generation 1 or one written before schema 2) is not detected. Detecting
//! that needs state outside the folder (the platform keystore); see the README.
//!
//! # The privacy record
//!
//! Schema 3 adds the device's own privacy record ([`crate::policy::PrivacyRecord`]): the
//! rounds it contributed to and their composed charge. It is sealed like everything else,
//! and rollback detection also keeps an older (smaller) record from being put back. A store
//! of schema 1 or 2 opens with an empty record. Schema 4 adds the training parameters'
//! `user_support_exponent` (older stores: 0).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedrec_shared::{GlobalModel, ModelShape, Objective, RoundModel, TrainParams, UserState};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::policy::{PrivacyRecord, RecordEntry};
use crate::sdk::Consent;
use crate::signals::{Event, EventKind};

/// The store's file name inside the SDK's folder.
pub const STORE_FILE: &str = "fedrec.store";
/// The temporary file a write goes through before it is renamed over [`STORE_FILE`].
pub const TEMP_FILE: &str = "fedrec.store.tmp";
/// Prefix of a store moved aside by recovery (`fedrec.store.corrupt-<unix seconds>-<random>`).
pub const QUARANTINE_PREFIX: &str = "fedrec.store.corrupt-";
/// The lock file: held locked by the open store for its lifetime (empty).
pub const LOCK_FILE: &str = "fedrec.lock";
/// The rollback counter: the generation of the last store written, sealed under the store's key.
pub const GENERATION_FILE: &str = "fedrec.generation";
/// The temporary file a write of [`GENERATION_FILE`] goes through.
pub const GENERATION_TEMP_FILE: &str = "fedrec.generation.tmp";
/// The file's magic bytes.
pub const MAGIC: [u8; 8] = *b"FEDRECST";
/// The magic bytes of [`GENERATION_FILE`] (same envelope as the store, an 8-byte payload).
pub const GENERATION_MAGIC: [u8; 8] = *b"FEDRECGN";
/// The envelope format this SDK writes (and the newest it reads).
pub const FORMAT_VERSION: u16 = 1;
/// The payload schema this SDK writes (and the newest it reads).
pub const SCHEMA_VERSION: u32 = 4;
/// The largest [`GENERATION_FILE`] read (it is 48 bytes).
const GENERATION_FILE_CAP: u64 = 256;
/// Length of the plaintext header (the associated data).
pub const HEADER_LEN: usize = 24;
const ALG_CHACHA20_POLY1305: u8 = 1;
const TAG_LEN: usize = 16;

/// Why the store could not be read or written. Messages never contain the contents or paths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Authentication failed: a wrong key, or a tampered or corrupted file (an AEAD cannot
    /// tell which).
    #[error("authentication failed: wrong key, or the file was tampered with or corrupted")]
    WrongKeyOrCorrupt,
    /// The file is shorter than a header and a tag.
    #[error("the store file is truncated")]
    Truncated,
    /// The file does not start with the store's magic bytes.
    #[error("the file is not a fedrec store")]
    NotAStore,
    /// The format or schema version is newer than this SDK reads.
    #[error("version {found} is newer than {supported}, the newest this SDK reads")]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
        /// The newest version this SDK reads.
        supported: u32,
    },
    /// The authenticated contents do not decode (names the field).
    #[error("invalid contents: {0}")]
    Invalid(&'static str),
    /// The file, or what would be written, exceeds the size cap.
    #[error("{size} bytes exceed the store's cap of {cap} bytes")]
    TooLarge {
        /// The size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// A filesystem operation failed.
    #[error("could not {op}: {kind}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error's kind.
        kind: io::ErrorKind,
    },
    /// The key was unusable or the random number generator failed.
    #[error("the cryptographic provider failed")]
    Crypto,
    /// The folder path is empty (it would put the store in the working directory).
    #[error("the store folder path is empty")]
    EmptyPath,
    /// Another open store (in this process or another) holds the folder's lock.
    #[error("the store folder is in use by another open SDK handle (this or another process)")]
    Locked,
    /// One of the store's names is taken by something other than a regular file.
    #[error("{name} is not a regular file (a symlink, FIFO, socket, device or folder)")]
    NotAFile {
        /// The file's name in the folder.
        name: &'static str,
    },
    /// The store is older than the last one written in this folder: an older copy was put
    /// back (see the module docs).
    #[error("the store (generation {found}) is older than the last one written here (generation {expected})")]
    Rollback {
        /// The store file's generation.
        found: u64,
        /// The counter's generation.
        expected: u64,
    },
    /// The store has been written more than once, but its rollback counter is missing.
    #[error("the store (generation {found}) has no rollback counter beside it")]
    CounterMissing {
        /// The store file's generation.
        found: u64,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |e| StoreError::Io { op, kind: e.kind() }
}

/// The user vector as last reconstructed, and the model version it was reconstructed against.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUser {
    /// The model version the vector belongs to.
    pub model_version: u64,
    /// The vector and bias.
    pub state: UserState,
}

/// Everything the store holds.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// The user's consent.
    pub consent: Consent,
    /// The interaction log, oldest first.
    pub events: Vec<Event>,
    /// The user vector, if reconstructed.
    pub user: Option<StoredUser>,
    /// The cached global model.
    pub model: Option<Arc<RoundModel>>,
    /// The installed ruleset, as signed by the coordinator (opaque here; verified on install
    /// and again on open).
    pub ruleset: Option<Vec<u8>>,
    /// The training parameters of the last task, if known.
    pub train: Option<TrainParams>,
    /// The rounds the device contributed to and their composed privacy charge.
    pub privacy: PrivacyRecord,
}

impl Contents {
    /// Overwrites the buffers that hold the user's data with zeros, best-effort: copies
    /// the allocator made earlier (on reallocation) are out of reach.
    pub fn wipe(&mut self) {
        self.events.fill(Event { item: 0, kind: EventKind::View, value: 0.0, timestamp_s: 0 });
        self.events.clear();
        if let Some(u) = &mut self.user {
            u.state.factors.fill(0.0);
            u.state.bias = 0.0;
        }
        self.user = None;
        if let Some(r) = &mut self.ruleset {
            r.fill(0);
        }
        self.ruleset = None;
        self.consent = Consent::default();
        self.privacy = PrivacyRecord::default();
        std::hint::black_box(&self.events);
    }
}

/// The store of one SDK folder: where the file is, the key, the size cap, the folder's lock
/// (held until the store is dropped) and the generation of the last write.
pub struct Store {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
    max_bytes: u64,
    /// The locked [`LOCK_FILE`]; dropping it releases the lock.
    _lock: File,
    /// The generation of the store file last read or written (0: none yet).
    generation: u64,
    /// The generation [`GENERATION_FILE`] is known to hold (`None`: missing or unknown).
    counter: Option<u64>,
    /// Whether the loaded store predates generations (schema 1).
    unversioned: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("max_bytes", &self.max_bytes)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store in `dir` (created if missing, `0700` on Unix) sealed under `key`, refusing files
    /// over `max_bytes`. Takes the folder's lock: [`StoreError::Locked`] if another store holds
    /// it, [`StoreError::EmptyPath`] for an empty `dir`.
    pub fn new(dir: &Path, key: &[u8; 32], max_bytes: u64) -> Result<Store, StoreError> {
        if dir.as_os_str().is_empty() {
            return Err(StoreError::EmptyPath);
        }
        create_private_dir(dir)?;
        let lock = lock_folder(dir)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| StoreError::Crypto)?;
        Ok(Store {
            dir: dir.to_owned(),
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            max_bytes,
            _lock: lock,
            generation: 0,
            counter: None,
            unversioned: false,
        })
    }

    /// The store file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The generation of the store file last read or written (0 before any).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Reads and opens the store; `None` if there is no store file yet. Never modifies a
    /// file. Refuses a store older than the rollback counter ([`StoreError::Rollback`],
    /// [`StoreError::CounterMissing`]).
    pub fn load(&mut self) -> Result<Option<Contents>, StoreError> {
        let Some(mut bytes) = read_regular(&self.path(), STORE_FILE, self.max_bytes)? else {
            // Nothing to roll back to; a counter left behind (the store was deleted) only
            // makes the next store's generation higher. One that does not open is replaced.
            self.counter = self.read_counter().ok().flatten();
            self.generation = self.counter.unwrap_or(0);
            return Ok(None);
        };
        let mut payload = open_sealed(&self.key, &mut bytes, &MAGIC)?;
        let decoded = decode(&payload);
        payload.fill(0);
        let (contents, found) = decoded?;
        // Read with the key that just opened the store: a counter it cannot open was tampered with.
        self.counter = self.read_counter()?;
        self.generation = found.max(self.counter.unwrap_or(0));
        self.unversioned = found == 0;
        match self.counter {
            Some(expected) if found < expected => Err(StoreError::Rollback { found, expected }),
            // Generation 1 without a counter: a crash between the first store and its counter.
            None if found > 1 => Err(StoreError::CounterMissing { found }),
            _ => Ok(Some(contents)),
        }
    }

    /// Whether the store just loaded should be written again at once: it predates
    /// generations (schema 1), or the rollback counter is missing or behind it.
    pub fn needs_rewrite(&self) -> bool {
        self.unversioned || self.counter != Some(self.generation)
    }

    /// Seals `contents` as the next generation and writes them atomically (temp file, fsync,
    /// rename, fsync of the folder), then writes the rollback counter the same way. On error
    /// the previous store file is intact. The store file is the commit point: if only the
    /// counter's write fails, the call still succeeds (the counter stays behind, which never
    /// refuses a store, and catches up at the next write).
    pub fn save(&mut self, contents: &Contents) -> Result<(), StoreError> {
        let generation = self.generation.saturating_add(1);
        let mut plain = encode(contents, generation);
        let size = (HEADER_LEN + plain.len() + TAG_LEN) as u64;
        if size > self.max_bytes {
            plain.fill(0);
            return Err(StoreError::TooLarge { size, cap: self.max_bytes });
        }
        let sealed = seal(&self.key, &self.rng, plain, &MAGIC)?;
        write_atomically(&self.dir.join(TEMP_FILE), &self.path(), &sealed)?;
        self.generation = generation;
        self.unversioned = false;
        self.counter = match self.write_counter(generation) {
            Ok(()) => Some(generation),
            Err(_) => None,
        };
        Ok(())
    }

    /// The generation in [`GENERATION_FILE`]; `None` if there is none.
    fn read_counter(&self) -> Result<Option<u64>, StoreError> {
        let path = self.dir.join(GENERATION_FILE);
        let Some(mut bytes) = read_regular(&path, GENERATION_FILE, GENERATION_FILE_CAP)? else {
            return Ok(None);
        };
        let invalid = |_| StoreError::Invalid("rollback counter (fedrec.generation)");
        let payload = open_sealed(&self.key, &mut bytes, &GENERATION_MAGIC).map_err(invalid)?;
        let value: [u8; 8] = payload.as_slice().try_into().map_err(|_| invalid(StoreError::Truncated))?;
        Ok(Some(u64::from_le_bytes(value)))
    }

    fn write_counter(&self, generation: u64) -> Result<(), StoreError> {
        let sealed = seal(&self.key, &self.rng, generation.to_le_bytes().to_vec(), &GENERATION_MAGIC)?;
        let tmp = self.dir.join(GENERATION_TEMP_FILE);
        write_atomically(&tmp, &self.dir.join(GENERATION_FILE), &sealed)
    }

    /// Moves an unreadable store aside (to `fedrec.store.corrupt-…` in the same folder) so a
    /// fresh one can start; returns whether there was a file to move. Nothing is deleted:
    /// [`Store::erase`] (or `Sdk::forget`) removes quarantined files too. The rollback
    /// counter stays, so the fresh store's generations continue above it.
    pub fn quarantine(&self) -> Result<bool, StoreError> {
        let mut suffix = [0u8; 4];
        self.rng.fill(&mut suffix).map_err(|_| StoreError::Crypto)?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("{QUARANTINE_PREFIX}{secs}-{}", hex(&suffix));
        match fs::rename(self.path(), self.dir.join(name)) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("move the store aside")(e)),
        }
    }

    /// Removes every file of this store (see [`Store::erase`]) while holding its lock; the
    /// store should be dropped afterwards.
    pub fn erase_files(&self) -> Result<usize, StoreError> {
        remove_files(&self.dir)
    }

    /// Removes every file of the store in `dir` (the store, leftover temp files, quarantined
    /// stores, the rollback counter and the lock file) and fsyncs the folder; returns how
    /// many files were removed. Other files in the folder are left alone. Works without the
    /// key, so a store that can no longer be opened can still be erased. Takes the folder's
    /// lock first: [`StoreError::Locked`] while a store is open on `dir`.
    pub fn erase(dir: &Path) -> Result<usize, StoreError> {
        if dir.as_os_str().is_empty() {
            return Err(StoreError::EmptyPath);
        }
        match fs::symlink_metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("inspect the store folder")(e)),
            Ok(_) => {}
        }
        let lock = lock_folder(dir)?;
        let removed = remove_files(dir);
        drop(lock);
        removed
    }
}

/// Whether `name` is one of the store's files.
fn is_store_file(name: &str) -> bool {
    [STORE_FILE, TEMP_FILE, GENERATION_FILE, GENERATION_TEMP_FILE, LOCK_FILE].contains(&name)
        || name.starts_with(QUARANTINE_PREFIX)
}

/// Removes the store's files in `dir`: the store first (so that a crash part-way never leaves
/// a store without its counter), the lock file last; then fsyncs the folder.
fn remove_files(dir: &Path) -> Result<usize, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("list the store folder")(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list the store folder"))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| is_store_file(n)) {
            names.push(name.to_owned());
        }
    }
    let rank = |n: &str| match n {
        STORE_FILE => 0,
        LOCK_FILE => 3,
        GENERATION_FILE => 2,
        _ => 1,
    };
    names.sort_by_key(|n| rank(n));
    for name in &names {
        fs::remove_file(dir.join(name)).map_err(io_err("remove a store file"))?;
    }
    sync_dir(dir)?;
    Ok(names.len())
}

/// Creates `dir` and its missing parents (`0700` on Unix); an existing folder is left as it is.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_err("create the store folder"))
}

/// Open options that create files `0600` on Unix.
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Refuses anything but a regular file at `path`, without opening it (a FIFO would block the
/// open); `Ok(false)` if nothing is there.
fn check_regular(path: &Path, name: &'static str) -> Result<bool, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(true),
        Ok(_) => Err(StoreError::NotAFile { name }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspect a store file")(e)),
    }
}

/// Reads the regular file at `path`, at most `cap` bytes; `None` if there is none.
fn read_regular(path: &Path, name: &'static str, cap: u64) -> Result<Option<Vec<u8>>, StoreError> {
    if !check_regular(path, name)? {
        return Ok(None);
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open a store file")(e)),
    };
    // Checked again on what was opened, in case the name was swapped in between.
    if !file.metadata().map_err(io_err("inspect a store file"))?.is_file() {
        return Err(StoreError::NotAFile { name });
    }
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes).map_err(io_err("read a store file"))?;
    if bytes.len() as u64 > cap {
        return Err(StoreError::TooLarge { size: bytes.len() as u64, cap });
    }
    Ok(Some(bytes))
}

/// Opens (creating, `0600`) and exclusively locks [`LOCK_FILE`] in `dir`.
fn lock_folder(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    check_regular(&path, LOCK_FILE)?;
    let file = private_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open the lock file"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io_err("inspect the lock file"))?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("restrict the lock file"))?;
        }
    }
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked),
        // A filesystem without locks: run unlocked rather than not at all.
        Err(fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => Ok(file),
        Err(fs::TryLockError::Error(e)) => Err(io_err("lock the store folder")(e)),
    }
}

/// Writes `bytes` to `tmp` (created afresh, `0600`), fsyncs it, renames it over `path` and
/// fsyncs the folder. On error `path` is intact and `tmp` is removed (best-effort).
fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let result = write_then_rename(tmp, path, bytes);
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    // A leftover of a crashed write (or anything else at that name) goes first: `create_new`
    // then neither follows a symlink nor opens a FIFO, and the new file gets mode 0600.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove a leftover temporary file")(e)),
    }
    let mut f = private_options()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err("create the temporary file"))?;
    f.write_all(bytes).map_err(io_err("write the temporary file"))?;
    f.sync_all().map_err(io_err("sync the temporary file"))?;
    drop(f);
    fs::rename(tmp, path).map_err(io_err("replace the store"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a rename or removal in `dir` durable (a no-op where folders cannot be opened).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync the store folder"))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header(nonce: &[u8; NONCE_LEN], magic: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10] = ALG_CHACHA20_POLY1305;
    h[12..].copy_from_slice(nonce);
    h
}

/// Seals `plain` (consumed; encrypted in place) into header ‖ ciphertext ‖ tag.
fn seal(
    key: &LessSafeKey,
    rng: &SystemRandom,
    mut plain: Vec<u8>,
    magic: &[u8; 8],
) -> Result<Vec<u8>, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| StoreError::Crypto)?;
    let header = header(&nonce, magic);
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut plain)
        .map_err(|_| StoreError::Crypto)?;
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(&plain);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Checks the header and authenticates and decrypts `file` in place; returns the payload.
fn open_sealed(key: &LessSafeKey, file: &mut [u8], magic: &[u8; 8]) -> Result<Vec<u8>, StoreError> {
    if file.len() < 8 {
        return Err(StoreError::Truncated);
    }
    if file[..8] != *magic {
        return Err(StoreError::NotAStore);
    }
    if file.len() < HEADER_LEN + TAG_LEN {
        return Err(StoreError::Truncated);
    }
    let format = u16::from_le_bytes([file[8], file[9]]);
    if format > FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            found: u32::from(format),
            supported: u32::from(FORMAT_VERSION),
        });
    }
    if format == 0 || file[10] != ALG_CHACHA20_POLY1305 || file[11] != 0 {
        return Err(StoreError::WrongKeyOrCorrupt);
    }
    let (head, body) = file.split_at_mut(HEADER_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&head[12..]);
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&*head), body)
        .map_err(|_| StoreError::WrongKeyOrCorrupt)?;
    let out = plain.to_vec();
    plain.fill(0);
    Ok(out)
}

/// Encodes `c` as a payload of the current schema: `u32` schema version, then the body.
///
/// Body of schema 4: the body of schema 3, then, when it has training parameters, their
/// `f32 user_support_exponent` (schemas 1–3 read as 0).
///
/// Body of schema 3: the body of schema 2, then the privacy record:
///
/// ```text
/// u64  rounds contributed
/// u32  n_orders, n_orders × f64 composed RDP (one per order of rdp::DEFAULT_ORDERS)
/// u32  n_entries, then per entry: u64 round, u64 model_version, f64 q, f64 noise_multiplier,
///                                 f32 clip_norm, f64 epsilon, i64 time_s
/// ```
///
/// Body of schema 2: `u64` generation (see the module docs), then the body of schema 1.
///
/// Body of schema 1, little-endian:
///
/// ```text
/// u8   consent flags (bit 0 personalization, bit 1 training)
/// u32  n_events, then per event: u32 item, u32 kind code, f32 value, i64 timestamp_s
/// u8   has_user;  if 1: u64 model_version, u32 dim, dim × f32 factors, f32 bias
/// u8   has_model; if 1: u64 version, u32 n_items, u32 dim, u32 n_segments, f32 global_mean,
///                       n_items·dim f32 factors, n_items f32 biases, n_segments·dim f32 centroids
/// u8   has_ruleset; if 1: u32 len, len bytes
/// u8   has_train; if 1: u8 objective (0 explicit, 1 implicit), f32 alpha, f32 l2_user,
///                       f32 l2_user_bias, f32 l2_item, f32 l2_item_bias
/// ```
pub fn encode(c: &Contents, generation: u64) -> Vec<u8> {
    let model_len = c.model.as_ref().map_or(0, |m| {
        let s = m.model.shape();
        4 * (s.n_items * (s.dim + 1) + s.n_segments * s.dim) + 32
    });
    let mut out = Vec::with_capacity(64 + c.events.len() * 20 + model_len);
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.push(u8::from(c.consent.personalization) | (u8::from(c.consent.training) << 1));
    put_len(&mut out, c.events.len());
    for e in &c.events {
        out.extend_from_slice(&e.item.to_le_bytes());
        out.extend_from_slice(&e.kind.code().to_le_bytes());
        out.extend_from_slice(&e.value.to_le_bytes());
        out.extend_from_slice(&e.timestamp_s.to_le_bytes());
    }
    out.push(u8::from(c.user.is_some()));
    if let Some(u) = &c.user {
        out.extend_from_slice(&u.model_version.to_le_bytes());
        put_len(&mut out, u.state.factors.len());
        put_f32s(&mut out, &u.state.factors);
        out.extend_from_slice(&u.state.bias.to_le_bytes());
    }
    out.push(u8::from(c.model.is_some()));
    if let Some(m) = &c.model {
        let s = m.model.shape();
        out.extend_from_slice(&m.version.to_le_bytes());
        for n in [s.n_items, s.dim, s.n_segments] {
            put_len(&mut out, n);
        }
        out.extend_from_slice(&m.model.global_mean.to_le_bytes());
        put_f32s(&mut out, m.model.factors_slice());
        put_f32s(&mut out, m.model.item_bias.as_slice().unwrap_or(&m.model.item_bias.to_vec()));
        put_f32s(&mut out, m.model.centroids_slice());
    }
    out.push(u8::from(c.ruleset.is_some()));
    if let Some(r) = &c.ruleset {
        put_len(&mut out, r.len());
        out.extend_from_slice(r);
    }
    out.push(u8::from(c.train.is_some()));
    if let Some(t) = &c.train {
        let (objective, alpha) = match t.objective {
            Objective::Explicit => (0u8, 0.0f32),
            Objective::Implicit { alpha } => (1, alpha),
        };
        out.push(objective);
        put_f32s(&mut out, &[alpha, t.l2_user, t.l2_user_bias, t.l2_item, t.l2_item_bias]);
    }
    let p = &c.privacy;
    out.extend_from_slice(&p.n_rounds().to_le_bytes());
    put_len(&mut out, p.rdp().len());
    for r in p.rdp() {
        out.extend_from_slice(&r.to_le_bytes());
    }
    put_len(&mut out, p.entries().len());
    for e in p.entries() {
        out.extend_from_slice(&e.round.to_le_bytes());
        out.extend_from_slice(&e.model_version.to_le_bytes());
        out.extend_from_slice(&e.q.to_le_bytes());
        out.extend_from_slice(&e.noise_multiplier.to_le_bytes());
        out.extend_from_slice(&e.clip_norm.to_le_bytes());
        out.extend_from_slice(&e.epsilon.to_le_bytes());
        out.extend_from_slice(&e.time_s.to_le_bytes());
    }
    if let Some(t) = &c.train {
        put_f32s(&mut out, &[t.user_support_exponent]);
    }
    out
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Lengths are bounded by the size cap long before u32::MAX.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, xs: &[f32]) {
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Decodes a payload (schema version, then body), migrating older schemas; returns the
/// contents and the generation (0 for schema 1, which had none).
pub fn decode(payload: &[u8]) -> Result<(Contents, u64), StoreError> {
    let mut r = Reader(payload);
    let version = r.u32()?;
    migrate(version, r.0)
}

/// Reads a body of schema `from` into the current [`Contents`] and its generation. Each past
/// schema keeps its decoder here; a schema newer than [`SCHEMA_VERSION`] is refused.
pub fn migrate(from: u32, body: &[u8]) -> Result<(Contents, u64), StoreError> {
    let mut r = Reader(body);
    let (contents, generation) = match from {
        1 => (decode_v1(&mut r)?, 0),
        2..=4 => {
            let generation = r.u64()?;
            if generation == 0 {
                return Err(StoreError::Invalid("generation"));
            }
            let mut contents = decode_v1(&mut r)?;
            if from >= 3 {
                contents.privacy = decode_record(&mut r)?;
            }
            if from >= 4
                && let Some(t) = contents.train.as_mut()
            {
                t.user_support_exponent = r.f32()?;
                t.validate().map_err(|_| StoreError::Invalid("training parameters"))?;
            }
            (contents, generation)
        }
        v if v > SCHEMA_VERSION => {
            return Err(StoreError::UnsupportedVersion { found: v, supported: SCHEMA_VERSION });
        }
        _ => return Err(StoreError::Invalid("schema version")),
    };
    if !r.0.is_empty() {
        return Err(StoreError::Invalid("trailing bytes"));
    }
    Ok((contents, generation))
}

/// The privacy record of schema 3 (see [`encode`]).
fn decode_record(r: &mut Reader<'_>) -> Result<PrivacyRecord, StoreError> {
    let n_rounds = r.u64()?;
    let n_orders = r.len(8)?;
    let rdp = (0..n_orders).map(|_| r.f64()).collect::<Result<Vec<_>, _>>()?;
    let n_entries = r.len(52)?;
    let mut entries = Vec::with_capacity(n_entries);
    for _ in 0..n_entries {
        entries.push(RecordEntry {
            round: r.u64()?,
            model_version: r.u64()?,
            q: r.f64()?,
            noise_multiplier: r.f64()?,
            clip_norm: r.f32()?,
            epsilon: r.f64()?,
            time_s: r.i64()?,
        });
    }
    PrivacyRecord::from_parts(rdp, n_rounds, entries).map_err(StoreError::Invalid)
}

/// The fields of schema 1 (also the start of schemas 2 and 3).
fn decode_v1(r: &mut Reader<'_>) -> Result<Contents, StoreError> {
    let flags = r.u8()?;
    if flags & !0b11 != 0 {
        return Err(StoreError::Invalid("consent flags"));
    }
    let consent = Consent { personalization: flags & 1 != 0, training: flags & 2 != 0 };
    let n_events = r.len(20)?;
    let mut events = Vec::with_capacity(n_events);
    for _ in 0..n_events {
        let item = r.u32()?;
        let kind = EventKind::from_code(r.u32()?).ok_or(StoreError::Invalid("event kind"))?;
        let value = r.f32()?;
        let timestamp_s = r.i64()?;
        let e = Event { item, kind, value, timestamp_s };
        e.validate().map_err(|_| StoreError::Invalid("event value"))?;
        events.push(e);
    }
    let user = if r.flag()? {
        let model_version = r.u64()?;
        let dim = r.len(4)?;
        let factors = r.f32s(dim)?;
        let bias = r.f32()?;
        Some(StoredUser { model_version, state: UserState { factors, bias } })
    } else {
        None
    };
    let model = if r.flag()? {
        let version = r.u64()?;
        let shape =
            ModelShape { n_items: r.u32()? as usize, dim: r.u32()? as usize, n_segments: r.u32()? as usize };
        let global_mean = r.f32()?;
        let n_factors = shape.n_items.checked_mul(shape.dim).ok_or(StoreError::Invalid("model shape"))?;
        let n_centroids =
            shape.n_segments.checked_mul(shape.dim).ok_or(StoreError::Invalid("model shape"))?;
        let factors = r.f32s(n_factors)?;
        let bias = r.f32s(shape.n_items)?;
        let centroids = r.f32s(n_centroids)?;
        let model = GlobalModel::from_flat(shape, factors, bias, global_mean, centroids)
            .map_err(|_| StoreError::Invalid("model"))?;
        Some(Arc::new(RoundModel::new(version, model)))
    } else {
        None
    };
    let ruleset = if r.flag()? {
        let n = r.len(1)?;
        Some(r.take(n)?.to_vec())
    } else {
        None
    };
    let train = if r.flag()? {
        let objective = r.u8()?;
        let [alpha, l2_user, l2_user_bias, l2_item, l2_item_bias] =
            [r.f32()?, r.f32()?, r.f32()?, r.f32()?, r.f32()?];
        let objective = match objective {
            0 => Objective::Explicit,
            1 => Objective::Implicit { alpha },
            _ => return Err(StoreError::Invalid("training objective")),
        };
        let t = TrainParams {
            objective,
            l2_user,
            l2_user_bias,
            l2_item,
            l2_item_bias,
            user_support_exponent: 0.0,
        };
        t.validate().map_err(|_| StoreError::Invalid("training parameters"))?;
        Some(t)
    } else {
        None
    };
    Ok(Contents { consent, events, user, model, ruleset, train, privacy: PrivacyRecord::default() })
}

/// A cursor over a payload; every read checks the remaining length first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if n > self.0.len() {
            return Err(StoreError::Invalid("length"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }
    fn flag(&mut self) -> Result<bool, StoreError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StoreError::Invalid("presence flag")),
        }
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, StoreError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
    fn f64(&mut self) -> Result<f64, StoreError> {
        Ok(f64::from_le_bytes(self.array()?))
    }
    /// A count of items of `item_size` bytes each, checked against what is left.
    fn len(&mut self, item_size: usize) -> Result<usize, StoreError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_size) > self.0.len() {
            return Err(StoreError::Invalid("length"));
        }
        Ok(n)
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, StoreError> {
        let bytes = self.take(n.checked_mul(4).ok_or(StoreError::Invalid("length"))?)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let model = GlobalModel::from_flat(
            ModelShape { n_items: 3, dim: 2, n_segments: 1 },
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            vec![1.0, 2.0, 3.0],
            3.5,
            vec![0.0, 1.0],
        )
        .expect("valid model");
        let c = Contents {
            consent: Consent { personalization: true, training: false },
            events: vec![Event { item: 2, kind: EventKind::Custom(9), value: 1.5, timestamp_s: -7 }],
            user: Some(StoredUser {
                model_version: 4,
                state: UserState { factors: vec![1.0, -1.0], bias: 0.5 },
            }),
            model: Some(Arc::new(RoundModel::new(4, model.clone()))),
            ruleset: Some(vec![1, 2, 3]),
            train: Some(TrainParams {
                objective: Objective::Implicit { alpha: 2.0 },
                l2_user: 0.1,
                l2_user_bias: 0.0,
                l2_item: 0.01,
                l2_item_bias: 0.0,
                user_support_exponent: 0.0,
            }),
            privacy: PrivacyRecord::default(),
        };
        let (d, generation) = decode(&encode(&c, 9)).expect("decodes");
        assert_eq!(generation, 9);
        assert_eq!(d.consent, c.consent);
        assert_eq!(d.events, c.events);
        assert_eq!(d.user, c.user);
        assert_eq!(d.model.as_ref().map(|m| (m.version, &m.model)), Some((4, &model)));
        assert_eq!(d.ruleset, c.ruleset);
        assert_eq!(d.train, c.train);
    }

    #[test]
    fn every_truncation_of_a_payload_is_an_error() {
        let c = Contents {
            events: vec![Event { item: 1, kind: EventKind::View, value: 1.0, timestamp_s: 5 }],
            ruleset: Some(vec![9; 5]),
            ..Contents::default()
        };
        let bytes = encode(&c, 1);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).err(), Some(StoreError::Invalid("trailing bytes")));
    }

    #[test]
    fn newer_schema_is_unsupported_not_garbage() {
        let mut bytes = encode(&Contents::default(), 1);
        bytes[..4].copy_from_slice(&(SCHEMA_VERSION + 1).to_le_bytes());
        assert_eq!(
            decode(&bytes).err(),
            Some(StoreError::UnsupportedVersion { found: SCHEMA_VERSION + 1, supported: SCHEMA_VERSION })
        );
        bytes[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&bytes).err(), Some(StoreError::Invalid("schema version")));
    }

    /// Bytes of the privacy record at the end of a schema 3 payload of `c` (and of a schema 4
    /// one without training parameters).
    fn record_len(c: &Contents) -> usize {
        8 + 4 + 8 * c.privacy.rdp().len() + 4 + 52 * c.privacy.entries().len()
    }

    /// Contents with a record of two charged rounds.
    fn with_record() -> Contents {
        let policy = crate::policy::PrivacyPolicy::production();
        let task = fedrec_shared::round::TaskPrivacy {
            mechanism: fedrec_shared::round::Mechanism::CentralGaussian,
            noise_multiplier: 2.0,
            clip_norm: 0.5,
            selection: fedrec_shared::round::TaskSelection::Poisson { q: 0.01 },
            min_reports: 1,
            population: Some(100_000),
            aggregation: fedrec_shared::round::Aggregation::Secure,
        };
        let mut c = Contents::default();
        for round in [3, 4] {
            let charge = policy.admit(&task, &c.privacy).expect("admitted");
            c.privacy.charge(&charge, round, 7, 1_700_000_000);
        }
        c
    }

    #[test]
    fn a_schema_1_payload_has_generation_0_and_schema_2_never_does() {
        // Schema 2 is schema 3 without the privacy record; schema 1 is schema 2 without the
        // generation. Both open with an empty record.
        let old = with_record();
        let v3 = encode(&old, 7);
        let body_end = v3.len() - record_len(&old);
        let mut v2 = 2u32.to_le_bytes().to_vec();
        v2.extend_from_slice(&v3[4..body_end]);
        let mut v1 = 1u32.to_le_bytes().to_vec();
        v1.extend_from_slice(&v3[12..body_end]);
        let (c1, g1) = decode(&v1).expect("schema 1 decodes");
        assert_eq!((g1, c1.privacy), (0, PrivacyRecord::default()));
        let (c2, g2) = decode(&v2).expect("schema 2 decodes");
        assert_eq!((g2, c2.privacy), (7, PrivacyRecord::default()));
        let (c3, g3) = decode(&v3).expect("schema 3 decodes");
        assert_eq!((g3, c3.privacy.n_rounds()), (7, 2));
        let zero = encode(&Contents::default(), 0);
        assert_eq!(decode(&zero).err(), Some(StoreError::Invalid("generation")));
    }

    #[test]
    fn the_privacy_record_round_trips_and_a_broken_one_is_refused() {
        let c = with_record();
        let (d, _) = decode(&encode(&c, 1)).expect("decodes");
        assert_eq!(d.privacy, c.privacy);
        let rounds: Vec<u64> = d.privacy.entries().map(|e| e.round).collect();
        assert_eq!(rounds, [3, 4]);
        // A NaN in the composition is refused, never read as "nothing spent".
        let mut bytes = encode(&c, 1);
        let rdp_at = bytes.len() - record_len(&c) + 12;
        bytes[rdp_at..rdp_at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert_eq!(decode(&bytes).err(), Some(StoreError::Invalid("privacy record")));
    }

    #[test]
    fn the_user_support_exponent_round_trips_and_older_schemas_read_zero() {
        let mut c = with_record();
        c.train = Some(TrainParams {
            objective: Objective::Implicit { alpha: 2.0 },
            l2_user: 0.5,
            l2_user_bias: 0.0,
            l2_item: 0.1,
            l2_item_bias: 0.0,
            user_support_exponent: 0.75,
        });
        let v4 = encode(&c, 5);
        let (d, g) = decode(&v4).expect("schema 4 decodes");
        assert_eq!((g, d.train), (5, c.train));
        // Schema 3 is schema 4 without the exponent: it opens with 0.
        let mut v3 = 3u32.to_le_bytes().to_vec();
        v3.extend_from_slice(&v4[4..v4.len() - 4]);
        let (d3, _) = decode(&v3).expect("schema 3 decodes");
        assert_eq!(d3.train.map(|t| t.user_support_exponent), Some(0.0));
        assert_eq!(d3.privacy, c.privacy);
        // An exponent out of range is refused, never used.
        let mut bad = v4.clone();
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&3.0f32.to_le_bytes());
        assert_eq!(decode(&bad).err(), Some(StoreError::Invalid("training parameters")));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = SCHEMA_VERSION.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes).err(), Some(StoreError::Invalid("length")));
    }
}
