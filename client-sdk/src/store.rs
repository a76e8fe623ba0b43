//! The sealed local store: interactions, user vector, cached model, consent — AEAD at rest, atomic writes, schema versions.
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

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedrec_shared::{GlobalModel, ModelShape, Objective, RoundModel, TrainParams, UserState};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::sdk::Consent;
use crate::signals::{Event, EventKind};

/// The store's file name inside the SDK's folder.
pub const STORE_FILE: &str = "fedrec.store";
/// The temporary file a write goes through before it is renamed over [`STORE_FILE`].
pub const TEMP_FILE: &str = "fedrec.store.tmp";
/// Prefix of a store moved aside by recovery (`fedrec.store.corrupt-<unix seconds>-<random>`).
pub const QUARANTINE_PREFIX: &str = "fedrec.store.corrupt-";
/// The file's magic bytes.
pub const MAGIC: [u8; 8] = *b"FEDRECST";
/// The envelope format this SDK writes (and the newest it reads).
pub const FORMAT_VERSION: u16 = 1;
/// The payload schema this SDK writes (and the newest it reads).
pub const SCHEMA_VERSION: u32 = 1;
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
        std::hint::black_box(&self.events);
    }
}

/// The store of one SDK folder: where the file is, the key, and the size cap.
pub struct Store {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
    max_bytes: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("max_bytes", &self.max_bytes).finish_non_exhaustive()
    }
}

impl Store {
    /// A store in `dir` (created if missing) sealed under `key`, refusing files over `max_bytes`.
    pub fn new(dir: &Path, key: &[u8; 32], max_bytes: u64) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create the store folder"))?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| StoreError::Crypto)?;
        Ok(Store { dir: dir.to_owned(), key: LessSafeKey::new(key), rng: SystemRandom::new(), max_bytes })
    }

    /// The store file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// Reads and opens the store; `None` if there is no store file yet. Never modifies the file.
    pub fn load(&self) -> Result<Option<Contents>, StoreError> {
        let file = match File::open(self.path()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open the store")(e)),
        };
        let mut bytes = Vec::new();
        file.take(self.max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_err("read the store"))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(StoreError::TooLarge { size: bytes.len() as u64, cap: self.max_bytes });
        }
        let mut payload = open_sealed(&self.key, &mut bytes)?;
        let contents = decode(&payload);
        payload.fill(0);
        contents.map(Some)
    }

    /// Seals `contents` and writes them atomically (temp file, fsync, rename, fsync of the
    /// folder). On error the previous store file is intact.
    pub fn save(&self, contents: &Contents) -> Result<(), StoreError> {
        let mut plain = encode(contents);
        let size = (HEADER_LEN + plain.len() + TAG_LEN) as u64;
        if size > self.max_bytes {
            plain.fill(0);
            return Err(StoreError::TooLarge { size, cap: self.max_bytes });
        }
        let sealed = seal(&self.key, &self.rng, plain)?;
        let tmp = self.dir.join(TEMP_FILE);
        let result = write_atomically(&tmp, &self.path(), &sealed);
        if result.is_err() {
            // Best-effort cleanup; the store file itself was not touched.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Moves an unreadable store aside (to `fedrec.store.corrupt-…` in the same folder) so a
    /// fresh one can start; returns whether there was a file to move. Nothing is deleted:
    /// [`Store::erase`] (or `Sdk::forget`) removes quarantined files too.
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

    /// Removes every file of the store in `dir` (the store, a leftover temp file, quarantined
    /// stores) and fsyncs the folder; returns how many files were removed. Other files in the
    /// folder are left alone. Works without the key, so a store that can no longer be opened
    /// can still be erased.
    pub fn erase(dir: &Path) -> Result<usize, StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list the store folder")(e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_err("list the store folder"))?;
            let name = entry.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n == STORE_FILE || n == TEMP_FILE || n.starts_with(QUARANTINE_PREFIX));
            if ours {
                fs::remove_file(entry.path()).map_err(io_err("remove a store file"))?;
                removed += 1;
            }
        }
        sync_dir(dir)?;
        Ok(removed)
    }
}

fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(tmp).map_err(io_err("create the temporary file"))?;
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

fn header(nonce: &[u8; NONCE_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10] = ALG_CHACHA20_POLY1305;
    h[12..].copy_from_slice(nonce);
    h
}

/// Seals `plain` (consumed; encrypted in place) into header ‖ ciphertext ‖ tag.
fn seal(key: &LessSafeKey, rng: &SystemRandom, mut plain: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| StoreError::Crypto)?;
    let header = header(&nonce);
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
fn open_sealed(key: &LessSafeKey, file: &mut [u8]) -> Result<Vec<u8>, StoreError> {
    if file.len() < 8 {
        return Err(StoreError::Truncated);
    }
    if file[..8] != MAGIC {
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
pub fn encode(c: &Contents) -> Vec<u8> {
    let model_len = c.model.as_ref().map_or(0, |m| {
        let s = m.model.shape();
        4 * (s.n_items * (s.dim + 1) + s.n_segments * s.dim) + 32
    });
    let mut out = Vec::with_capacity(64 + c.events.len() * 20 + model_len);
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
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

/// Decodes a payload (schema version, then body), migrating older schemas.
pub fn decode(payload: &[u8]) -> Result<Contents, StoreError> {
    let mut r = Reader(payload);
    let version = r.u32()?;
    migrate(version, r.0)
}

/// Reads a body of schema `from` into the current [`Contents`]. Each past schema keeps its
/// decoder here; a schema newer than [`SCHEMA_VERSION`] is refused.
pub fn migrate(from: u32, body: &[u8]) -> Result<Contents, StoreError> {
    match from {
        1 => decode_v1(body),
        v if v > SCHEMA_VERSION => {
            Err(StoreError::UnsupportedVersion { found: v, supported: SCHEMA_VERSION })
        }
        _ => Err(StoreError::Invalid("schema version")),
    }
}

fn decode_v1(body: &[u8]) -> Result<Contents, StoreError> {
    let mut r = Reader(body);
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
        let t = TrainParams { objective, l2_user, l2_user_bias, l2_item, l2_item_bias };
        t.validate().map_err(|_| StoreError::Invalid("training parameters"))?;
        Some(t)
    } else {
        None
    };
    if !r.0.is_empty() {
        return Err(StoreError::Invalid("trailing bytes"));
    }
    Ok(Contents { consent, events, user, model, ruleset, train })
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
            }),
        };
        let d = decode(&encode(&c)).expect("decodes");
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
        let bytes = encode(&c);
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).err(), Some(StoreError::Invalid("trailing bytes")));
    }

    #[test]
    fn newer_schema_is_unsupported_not_garbage() {
        let mut bytes = encode(&Contents::default());
        bytes[..4].copy_from_slice(&(SCHEMA_VERSION + 1).to_le_bytes());
        assert_eq!(
            decode(&bytes).err(),
            Some(StoreError::UnsupportedVersion { found: SCHEMA_VERSION + 1, supported: SCHEMA_VERSION })
        );
        bytes[..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&bytes).err(), Some(StoreError::Invalid("schema version")));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = SCHEMA_VERSION.to_le_bytes().to_vec();
        bytes.push(0);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&bytes).err(), Some(StoreError::Invalid("length")));
    }
}
