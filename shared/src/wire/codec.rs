//! Framing, hard size limits, and the encoder and decoders of protocol v3.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::WireError;
use super::messages::{
    MAX_NEIGHBOURS, PUBLIC_KEY_LEN, Request, Response, SEALED_PAIR_LEN, SHARE_LEN, check_request,
    check_response,
};
use crate::model::ModelShape;

/// The protocol version this side speaks; the first field of every payload.
pub const PROTOCOL_VERSION: u16 = 3;
/// The TLS ALPN identifier of protocol v3 (an older peer's `fedrec/1` or `fedrec/2` fails the
/// TLS handshake).
pub const ALPN: &[u8] = b"fedrec/3";
/// Length of a frame's length prefix (a little-endian `u32`).
pub const LEN_PREFIX: usize = 4;

/// Payload limit of a check-in. Its fields are bounded (a token of at most 512 bytes, a
/// version string of at most 64) and need about 600 bytes at most; the rest is headroom.
pub const CHECK_IN_LIMIT: usize = 4 * 1024;
/// Payload limit of every response but a task (not selected, ack, error, aborted): an error,
/// the largest, needs under 300 bytes.
pub const RESPONSE_LIMIT: usize = 1024;
/// Bytes an upload needs besides its values: version (≤ 3), variant index (≤ 5), round
/// (≤ 10), the array's length (≤ 10), the clip bit (≤ 2) and the nonce (16) make 46.
pub const UPLOAD_OVERHEAD: usize = 64;
/// Bytes a task needs besides the model's values: version, variant index and the task's own
/// fields take at most 69, the model's version, dimensions, array lengths and global mean at
/// most 74; 143 in all.
pub const TASK_OVERHEAD: usize = 256;
/// Payload limit of a rules answer: a signed ruleset ([`super::rules::MAX_SIGNED_RULESET_LEN`])
/// plus the version and two variant indices (≤ 13 bytes), with headroom.
pub const RULES_LIMIT: usize = super::rules::MAX_SIGNED_RULESET_LEN + 64;

/// Bytes a secure-aggregation message needs besides its lists or words: version (≤ 3),
/// variant index (≤ 5), round (≤ 10), one or two list counts or a byte-string length (≤ 10),
/// the word width (1) and the nonce (16) make at most 45.
pub const SECURE_OVERHEAD: usize = 64;
/// Payload limit of a key advertisement: version, variant index, round (≤ 18), two keys (64)
/// and the nonce (16) make at most 98 bytes.
pub const ADVERTISE_KEYS_LIMIT: usize = 128;
/// Most bytes one sealed pair takes in a list: the peer's index (varint ≤ 5), the length (1)
/// and the ciphertext.
pub const SEALED_PAIR_WIRE: usize = 5 + 1 + SEALED_PAIR_LEN;
/// Most bytes one revealed share takes in a list: the owner's index (varint ≤ 5) and the share.
pub const REVEALED_SHARE_WIRE: usize = 5 + SHARE_LEN;
/// Most bytes one neighbour takes in a share-keys request: its index (varint ≤ 5) and two keys.
pub const NEIGHBOUR_WIRE: usize = 5 + 2 * PUBLIC_KEY_LEN;
/// Payload limit of a device's sealed pairs ([`Request::EncryptedShares`]) and of the pairs
/// forwarded to it ([`Response::MaskedInputRequest`]): [`MAX_NEIGHBOURS`] pairs.
pub const SEALED_PAIRS_LIMIT: usize = MAX_NEIGHBOURS * SEALED_PAIR_WIRE + SECURE_OVERHEAD;
/// Payload limit of an unmask answer: [`MAX_NEIGHBOURS`]` + 1` revealed shares in both lists
/// together (the dropped and the surviving neighbours are disjoint, plus the device's own).
pub const UNMASK_SHARES_LIMIT: usize = (MAX_NEIGHBOURS + 1) * REVEALED_SHARE_WIRE + SECURE_OVERHEAD;
/// Bytes a share-keys request needs besides its neighbours: version, variant index, round
/// (≤ 18), seed (32), `n`, `k`, `t`, `bits`, index (≤ 25) and the list's count (≤ 3) make 78.
pub const SHARE_KEYS_OVERHEAD: usize = 128;
/// Payload limit of a share-keys request: [`MAX_NEIGHBOURS`] neighbours.
pub const SHARE_KEYS_LIMIT: usize = MAX_NEIGHBOURS * NEIGHBOUR_WIRE + SHARE_KEYS_OVERHEAD;
/// Payload limit of an unmask request: [`MAX_NEIGHBOURS`] indices (varint ≤ 5) in both lists
/// together.
pub const UNMASK_LIMIT: usize = MAX_NEIGHBOURS * 5 + SECURE_OVERHEAD;

/// Payload limit of an upload for `shape`: 4 bytes per value of the layout, plus [`UPLOAD_OVERHEAD`].
pub fn upload_limit(shape: &ModelShape) -> usize {
    let ModelShape { n_items, dim, n_segments } = *shape;
    // The layout: item factors, item biases, global mean, centroid sums, centroid counts.
    let n_values = n_items
        .saturating_mul(dim)
        .saturating_add(n_items)
        .saturating_add(1)
        .saturating_add(n_segments.saturating_mul(dim))
        .saturating_add(n_segments);
    n_values.saturating_mul(4).saturating_add(UPLOAD_OVERHEAD)
}

/// Payload limit of a masked input for `shape`: 8 bytes per word of the layout plus the clip
/// bit (the widest words, for a ring of more than 32 bits), plus [`SECURE_OVERHEAD`].
pub fn masked_input_limit(shape: &ModelShape) -> usize {
    let ModelShape { n_items, dim, n_segments } = *shape;
    // The layout (see upload_limit), plus the clip bit.
    let n_words = n_items
        .saturating_mul(dim)
        .saturating_add(n_items)
        .saturating_add(1)
        .saturating_add(n_segments.saturating_mul(dim))
        .saturating_add(n_segments)
        .saturating_add(1);
    n_words.saturating_mul(8).saturating_add(SECURE_OVERHEAD)
}

/// Payload limit of a task carrying a model of `shape`: 4 bytes per model parameter, plus [`TASK_OVERHEAD`].
pub fn task_limit(shape: &ModelShape) -> usize {
    let ModelShape { n_items, dim, n_segments } = *shape;
    // Item factors, item biases, global mean, centroids.
    let n_values = n_items
        .saturating_mul(dim)
        .saturating_add(n_items)
        .saturating_add(1)
        .saturating_add(n_segments.saturating_mul(dim));
    n_values.saturating_mul(4).saturating_add(TASK_OVERHEAD)
}

/// The hard payload limit of every message kind, for one model shape.
///
/// The coordinator knows its model's shape; a device knows the shape of the catalogue it was
/// built for (or takes the largest shape it is willing to download).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    upload: usize,
    task: usize,
    masked_input: usize,
}

impl Limits {
    /// The limits for a model of `shape`.
    pub fn for_shape(shape: &ModelShape) -> Self {
        Self { upload: upload_limit(shape), task: task_limit(shape), masked_input: masked_input_limit(shape) }
    }

    /// Payload limit of a check-in ([`CHECK_IN_LIMIT`]).
    pub fn check_in(&self) -> usize {
        CHECK_IN_LIMIT
    }

    /// Payload limit of an upload ([`upload_limit`]).
    pub fn upload(&self) -> usize {
        self.upload
    }

    /// Payload limit of a task, model included ([`task_limit`]).
    pub fn task(&self) -> usize {
        self.task
    }

    /// Payload limit of any other response ([`RESPONSE_LIMIT`]).
    pub fn response(&self) -> usize {
        RESPONSE_LIMIT
    }

    /// Payload limit of a key advertisement ([`ADVERTISE_KEYS_LIMIT`]).
    pub fn advertise_keys(&self) -> usize {
        ADVERTISE_KEYS_LIMIT
    }

    /// Payload limit of a device's sealed pairs, and of the pairs forwarded to it ([`SEALED_PAIRS_LIMIT`]).
    pub fn sealed_pairs(&self) -> usize {
        SEALED_PAIRS_LIMIT
    }

    /// Payload limit of a masked input ([`masked_input_limit`]).
    pub fn masked_input(&self) -> usize {
        self.masked_input
    }

    /// Payload limit of an unmask answer ([`UNMASK_SHARES_LIMIT`]).
    pub fn unmask_shares(&self) -> usize {
        UNMASK_SHARES_LIMIT
    }

    /// Payload limit of a share-keys request ([`SHARE_KEYS_LIMIT`]).
    pub fn share_keys(&self) -> usize {
        SHARE_KEYS_LIMIT
    }

    /// Payload limit of an unmask request ([`UNMASK_LIMIT`]).
    pub fn unmask(&self) -> usize {
        UNMASK_LIMIT
    }

    /// The largest request payload: what the coordinator passes to [`frame_len`]. With the
    /// secure-aggregation messages of v2 this is the masked input (8 bytes a word) for every
    /// shape but the smallest, where the sealed pairs of [`MAX_NEIGHBOURS`] neighbours are larger.
    pub fn max_request(&self) -> usize {
        self.check_in()
            .max(self.upload)
            .max(self.advertise_keys())
            .max(self.sealed_pairs())
            .max(self.masked_input)
            .max(self.unmask_shares())
    }

    /// Payload limit of a rules answer ([`RULES_LIMIT`]).
    pub fn rules(&self) -> usize {
        RULES_LIMIT
    }

    /// The largest response payload: what a device passes to [`frame_len`].
    pub fn max_response(&self) -> usize {
        self.task
            .max(self.response())
            .max(self.rules())
            .max(self.share_keys())
            .max(self.sealed_pairs())
            .max(self.unmask())
    }

    /// The limit of the request with this variant index (see [`Request`]).
    fn request_kind(&self, index: u32) -> Option<usize> {
        match index {
            0 => Some(self.check_in()),
            1 => Some(self.upload),
            2 => Some(self.check_in()),
            3 => Some(self.advertise_keys()),
            4 => Some(self.sealed_pairs()),
            5 => Some(self.masked_input),
            6 => Some(self.unmask_shares()),
            _ => None,
        }
    }

    /// The limit of the response with this variant index (see [`Response`]).
    fn response_kind(&self, index: u32) -> Option<usize> {
        match index {
            0 => Some(self.task),
            1..=4 => Some(self.response()),
            5 => Some(self.rules()),
            6 => Some(self.task),
            7 => Some(self.share_keys()),
            8 => Some(self.sealed_pairs()),
            9 => Some(self.unmask()),
            10 => Some(self.task),
            _ => None,
        }
    }
}

/// A message that can be framed: a [`Request`] or a [`Response`].
pub trait Message: Serialize + sealed::Sealed {}

impl Message for Request {}
impl Message for Response {}

mod sealed {
    use super::WireError;

    pub trait Sealed {
        /// Checks what the types cannot express (the peer's decoder checks the same).
        fn check(&self) -> Result<(), WireError>;
    }
}

impl sealed::Sealed for Request {
    fn check(&self) -> Result<(), WireError> {
        check_request(self)
    }
}

impl sealed::Sealed for Response {
    fn check(&self) -> Result<(), WireError> {
        check_response(self)
    }
}

#[derive(Serialize)]
struct Envelope<'a, B> {
    version: u16,
    body: &'a B,
}

/// The frame of `msg`: length prefix, then the payload.
///
/// Fails if a field is longer than the protocol allows (the peer would refuse the message),
/// or if the payload does not fit a `u32` length.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, WireError> {
    msg.check()?;
    let envelope = Envelope { version: PROTOCOL_VERSION, body: msg };
    let mut out = postcard::to_extend(&envelope, vec![0u8; LEN_PREFIX])
        .expect("postcard writes wire types, whose lengths are all known, into a Vec without error");
    let len = out.len() - LEN_PREFIX;
    let prefix = u32::try_from(len)
        .map_err(|_| WireError::TooLarge { len, limit: usize::try_from(u32::MAX).unwrap_or(usize::MAX) })?;
    out[..LEN_PREFIX].copy_from_slice(&prefix.to_le_bytes());
    Ok(out)
}

/// The payload length a frame's prefix announces, refused if it exceeds `limit` (so that the
/// reader need not read it).
pub fn frame_len(prefix: [u8; LEN_PREFIX], limit: usize) -> Result<usize, WireError> {
    let len = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Decodes a request payload (the bytes after the length prefix), within `limits`.
///
/// Fails with [`WireError::TooLarge`] (above [`Limits::max_request`], or above the limit of
/// its kind), [`WireError::VersionMismatch`], [`WireError::Malformed`], or
/// [`WireError::Invalid`] (a field longer than the protocol allows). An upload still has to
/// be checked against the round ([`super::Upload::verify`]).
pub fn decode_request(payload: &[u8], limits: &Limits) -> Result<Request, WireError> {
    let request: Request = decode(payload, limits.max_request(), |i| limits.request_kind(i))?;
    check_request(&request)?;
    Ok(request)
}

/// Decodes a response payload (the bytes after the length prefix), within `limits`.
///
/// Fails as [`decode_request`] does. A task's model is checked by the conversion
/// ([`Response::into_inbound`]), not here.
pub fn decode_response(payload: &[u8], limits: &Limits) -> Result<Response, WireError> {
    let response: Response = decode(payload, limits.max_response(), |i| limits.response_kind(i))?;
    check_response(&response)?;
    Ok(response)
}

/// The steps every decoder takes, each before the next reads further: the overall limit, the
/// version, the limit of the message kind, then the body, which must use every byte.
fn decode<T: DeserializeOwned>(
    payload: &[u8],
    max: usize,
    kind_limit: impl FnOnce(u32) -> Option<usize>,
) -> Result<T, WireError> {
    if payload.len() > max {
        return Err(WireError::TooLarge { len: payload.len(), limit: max });
    }
    let (version, body) = postcard::take_from_bytes::<u16>(payload).map_err(malformed)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::VersionMismatch { got: version, expected: PROTOCOL_VERSION });
    }
    let (index, _) = postcard::take_from_bytes::<u32>(body).map_err(malformed)?;
    let limit = kind_limit(index).ok_or_else(|| WireError::Malformed("unknown message kind".into()))?;
    if payload.len() > limit {
        return Err(WireError::TooLarge { len: payload.len(), limit });
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} bytes after the end of the message", rest.len())));
    }
    Ok(msg)
}

/// Postcard's error texts describe what the decoder hit, never the bytes themselves.
fn malformed(e: postcard::Error) -> WireError {
    WireError::Malformed(e.to_string())
}
