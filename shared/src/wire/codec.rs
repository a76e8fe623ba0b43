//! Framing, hard size limits, and the encoder and decoders of protocol v1.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::WireError;
use super::messages::{Request, Response, check_request, check_response};
use crate::model::ModelShape;

/// The protocol version this side speaks; the first field of every payload.
pub const PROTOCOL_VERSION: u16 = 1;
/// The TLS ALPN identifier of protocol v1.
pub const ALPN: &[u8] = b"fedrec/1";
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
}

impl Limits {
    /// The limits for a model of `shape`.
    pub fn for_shape(shape: &ModelShape) -> Self {
        Self { upload: upload_limit(shape), task: task_limit(shape) }
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

    /// The largest request payload: what the coordinator passes to [`frame_len`].
    pub fn max_request(&self) -> usize {
        self.check_in().max(self.upload)
    }

    /// Payload limit of a rules answer ([`RULES_LIMIT`]).
    pub fn rules(&self) -> usize {
        RULES_LIMIT
    }

    /// The largest response payload: what a device passes to [`frame_len`].
    pub fn max_response(&self) -> usize {
        self.task.max(self.response()).max(self.rules())
    }

    /// The limit of the request with this variant index (see [`Request`]).
    fn request_kind(&self, index: u32) -> Option<usize> {
        match index {
            0 => Some(self.check_in()),
            1 => Some(self.upload),
            2 => Some(self.check_in()),
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
