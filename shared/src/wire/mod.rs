//! The wire format (protocol v3): the messages devices and the coordinator exchange, their framing and hard size limits, and the explicit conversions to and from the round machines' internal types.
//!
//! This is the only module of `fedrec-shared` that derives `Serialize`/`Deserialize`. The
//! wire types are plain data, separate from the internal ones ([`crate::round::ServerMessage`],
//! [`crate::round::ClientMessage`], [`crate::GlobalModel`], …): a peer's message becomes an
//! internal value only through a conversion that checks it, and an internal value reaches
//! the network only through a conversion that chooses what to send.
//!
//! # Transport and framing
//!
//! QUIC with TLS 1.3 and ALPN [`ALPN`]. Each request and its response use one bidirectional
//! stream. A message, in either direction, is
//!
//! ```text
//! frame    = len: u32 little-endian || payload (len bytes)
//! payload  = version: varint u16 (= PROTOCOL_VERSION) || body
//! body     = variant index: varint u32 || the variant's fields, in declaration order
//! ```
//!
//! The payload is postcard: unsigned integers are LEB128 varints, `f32` is 4 little-endian
//! bytes, `bool` one byte (0 or 1), `Option` a byte (0 or 1) then the value, strings and
//! byte strings a varint length then the bytes, `[u8; N]` N raw bytes, a list a varint count
//! then its elements, a struct its fields in order with nothing between them. Float arrays
//! (an update, a model's parameters) are byte strings: varint `4·n`, then `n` little-endian
//! `f32`s. (Postcard's own `Vec<f32>` counts elements instead; counting bytes lets a decoder
//! see that they are all present before it allocates anything.)
//!
//! | request ([`Request`]) | index | fields |
//! | --- | --- | --- |
//! | [`CheckIn`] | 0 | `token` bytes ≤ [`MAX_TOKEN_LEN`], `sdk_version` string ≤ [`MAX_SDK_VERSION_LEN`], `capabilities` u32, `cached_model_version` `Option<u64>` |
//! | [`Upload`] | 1 | `round` u64, `update` float array (dense, the layout's length), `within_bound` `Option<bool>`, `nonce` `[u8; 16]` |
//! | [`rules::FetchRules`] | 2 | `token` bytes ≤ [`MAX_TOKEN_LEN`], `have_version` `Option<u64>` |
//! | [`AdvertiseKeys`] | 3 | `round` u64, `cipher_public` `[u8; 32]`, `mask_public` `[u8; 32]`, `nonce` `[u8; 16]` |
//! | [`EncryptedShares`] | 4 | `round` u64, `shares` list ≤ [`MAX_NEIGHBOURS`] of ([`WireSealedPair`]: `peer` u32, `ciphertext` bytes = [`SEALED_PAIR_LEN`] (104)), `nonce` `[u8; 16]` |
//! | [`MaskedInput`] | 5 | `round` u64, `words` word array (below), `nonce` `[u8; 16]` |
//! | [`UnmaskShares`] | 6 | `round` u64, `mask_key_shares` list, `self_mask_shares` list, both of ([`WireRevealedShare`]: `owner` u32, `share` `[u8; 44]`), ≤ [`MAX_NEIGHBOURS`]` + 1` in both together, `nonce` `[u8; 16]` |
//!
//! | response ([`Response`]) | index | fields |
//! | --- | --- | --- |
//! | `Task` ([`WireTask`]) | 0 | `round` u64, `model_version` u64, `train` [`WireTrainParams`], `clip_norm` f32, `report_clip_bit` bool, `report_window_ms` u64, `model` `Option<`[`WireModel`]`>` |
//! | `NotSelected` | 1 | `round` u64, `retry_after_ms` u64 |
//! | `Ack` | 2 | `round` u64 |
//! | `Error` | 3 | `code` u16 ([`ErrorCode`]), `message` string ≤ [`MAX_ERROR_MESSAGE_LEN`], `retry_after_ms` `Option<u64>` |
//! | `Aborted` | 4 | `round` u64 |
//! | `Rules` ([`rules::RulesAnswer`]) | 5 | variant index, then: 0 `Ruleset` (`payload` bytes ≤ [`rules::MAX_RULESET_LEN`], `signature` 64 bytes), 1 `Unchanged` (`version` u64), 2 `NoRuleset` |
//! | `Finished` | 6 | `model_version` u64, `model` `Option<`[`WireModel`]`>` |
//! | `ShareKeys` ([`WireShareKeys`]) | 7 | `round` u64, `seed` `[u8; 32]`, `n` u32, `k` u32, `t` u32, `bits` u32, `index` u32, `neighbours` list ≤ [`MAX_NEIGHBOURS`] of ([`WireNeighbour`]: `index` u32, `cipher_public` `[u8; 32]`, `mask_public` `[u8; 32]`) |
//! | `MaskedInputRequest` | 8 | `round` u64, `shares` list ≤ [`MAX_NEIGHBOURS`] of [`WireSealedPair`] (`peer` names the sender) |
//! | `Unmask` | 9 | `round` u64, `dropped` list of u32, `survivors` list of u32, ≤ [`MAX_NEIGHBOURS`] in both together |
//!
//! A **word array** (the masked input of secure aggregation) is a byte string: one width byte
//! `w` (1, 2, 4 or 8), then each word as `w` little-endian bytes, so its varint length is
//! `1 + w·d`. The encoder writes the narrowest width every word fits (a ring of `bits` bits:
//! 1 byte up to 8 bits, 2 up to 16 — distributed noise's usual ring —, 4 up to 32, else 8);
//! the decoder refuses any other width and a length that is not `1 + w·d`. The words are uniform modulo `2^bits`, so varints would not shrink them, and the
//! width reveals nothing about the update. The secure-aggregation requests carry no token:
//! like an upload, they are accepted only on a connection whose check-in was verified, and
//! their nonce feeds the coordinator's replay guard ([`Request::nonce`]).
//!
//! An upload is always dense: whatever an [`crate::update::UpdateVector`] stores in memory,
//! every value of the layout is written, so the size of an upload depends only on the model
//! shape (and on the varint of its round number), never on which items the user touched.
//!
//! # Limits
//!
//! Every message kind has a hard limit on its payload length ([`Limits`]): a check-in
//! [`CHECK_IN_LIMIT`], an upload [`upload_limit`] (4 bytes per value of the layout plus
//! [`UPLOAD_OVERHEAD`]), a task [`task_limit`] (4 bytes per model parameter plus
//! [`TASK_OVERHEAD`]), a rules answer [`RULES_LIMIT`], any other response [`RESPONSE_LIMIT`]; a
//! rules request has the check-in's limit. The secure-aggregation messages' limits follow
//! from [`MAX_NEIGHBOURS`] (1,024) and the model shape:
//!
//! | message | limit | bytes |
//! | --- | --- | --- |
//! | `AdvertiseKeys` | [`ADVERTISE_KEYS_LIMIT`] | 128 |
//! | `EncryptedShares`, `MaskedInputRequest` | [`SEALED_PAIRS_LIMIT`]: [`MAX_NEIGHBOURS`] × [`SEALED_PAIR_WIRE`] (110) + [`SECURE_OVERHEAD`] | 112,704 |
//! | `MaskedInput` | [`masked_input_limit`]: 8 × (layout length + 1) + [`SECURE_OVERHEAD`] | 446,240 for ML-100K (`d` = 55,771) |
//! | `UnmaskShares` | [`UNMASK_SHARES_LIMIT`]: ([`MAX_NEIGHBOURS`] + 1) × [`REVEALED_SHARE_WIRE`] (49) + [`SECURE_OVERHEAD`] | 50,289 |
//! | `ShareKeys` | [`SHARE_KEYS_LIMIT`]: [`MAX_NEIGHBOURS`] × [`NEIGHBOUR_WIRE`] (69) + [`SHARE_KEYS_OVERHEAD`] | 70,784 |
//! | `Unmask` | [`UNMASK_LIMIT`]: [`MAX_NEIGHBOURS`] × 5 + [`SECURE_OVERHEAD`] | 5,184 |
//!
//! So [`Limits::max_request`], the frame limit a coordinator reads with, is the masked input's
//! limit for any real model (about twice the upload's). A reader checks the length
//! prefix with [`frame_len`] before reading the payload; the decoders check the length again,
//! then the version, then the message kind's own limit, all before parsing the body. Decoding
//! never panics, and allocates at most what the payload holds.
//!
//! # Versions
//!
//! The version is the first field of every payload, in this and every later protocol
//! version, so a decoder reads it alone first: a payload of another version is
//! [`WireError::VersionMismatch`] even when its body is not v3. The coordinator answers it with
//! [`ErrorCode::VersionMismatch`] in a v3 envelope.
//!
//! v2 added the secure-aggregation messages (request indices 3–6, response indices 7–9) and
//! changed nothing in the layout of the v1 messages but the version number. v3 added
//! `user_support_exponent` (f32) at the end of [`WireTrainParams`] (in `Task` and
//! `CompactTask`) and changed nothing else. An older peer cannot talk to a v3 one: over QUIC
//! its ALPN `fedrec/1` or `fedrec/2` fails the TLS handshake, and an older payload that
//! reaches a v3 decoder is [`WireError::VersionMismatch`]`{ got: 2, expected: 3 }`.

mod codec;
mod convert;
mod messages;
pub mod rules;

pub use codec::{
    ADVERTISE_KEYS_LIMIT, ALPN, CHECK_IN_LIMIT, LEN_PREFIX, Limits, Message, NEIGHBOUR_WIRE,
    PROTOCOL_VERSION, RESPONSE_LIMIT, REVEALED_SHARE_WIRE, RULES_LIMIT, SEALED_PAIR_WIRE, SEALED_PAIRS_LIMIT,
    SECURE_OVERHEAD, SHARE_KEYS_LIMIT, SHARE_KEYS_OVERHEAD, TASK_OVERHEAD, UNMASK_LIMIT, UNMASK_SHARES_LIMIT,
    UPLOAD_OVERHEAD, decode_request, decode_response, encode, frame_len, masked_input_limit, task_limit,
    upload_limit,
};
pub use convert::Inbound;
pub use messages::{
    AdvertiseKeys, CheckIn, EncryptedShares, ErrorCode, MAX_ERROR_MESSAGE_LEN, MAX_NEIGHBOURS,
    MAX_SDK_VERSION_LEN, MAX_TOKEN_LEN, MaskedInput, NONCE_LEN, PUBLIC_KEY_LEN, Request, Response,
    SEALED_PAIR_LEN, SEED_LEN, SHARE_LEN, UnmaskShares, Upload, WireAggregation, WireCompactModel,
    WireCompactTask, WireFactors, WireMechanism, WireModel, WireNeighbour, WireObjective, WirePrivacy,
    WireRevealedShare, WireSealedPair, WireSelection, WireShareKeys, WireSubset, WireTask, WireTrainParams,
};

use crate::error::UpdateError;

/// Why bytes from a peer (or a wire value) could not become a message or an internal value.
///
/// Every variant means "the peer misbehaved" when it comes from decoding what a peer sent;
/// [`WireError::code`] is the code to answer it with. No variant carries payload bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The payload is longer than the limit for its kind (or the frame length than the reader's limit).
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Length of the payload (or announced by the length prefix).
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The payload's protocol version is not [`PROTOCOL_VERSION`].
    #[error("protocol version {got}, this side speaks {expected}")]
    VersionMismatch {
        /// Version in the payload.
        got: u16,
        /// [`PROTOCOL_VERSION`].
        expected: u16,
    },
    /// The payload is not a well-formed message (the text says what the decoder hit, never what the bytes were).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message is well formed but breaks a rule of the protocol: a field too long, lengths
    /// that disagree with the model shape, a non-finite model value, a model of another version.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The upload's vector does not fit the round: wrong length, non-finite, or above the clip norm.
    #[error("invalid update: {0}")]
    InvalidUpdate(#[from] UpdateError),
}

impl WireError {
    /// The code the coordinator answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::TooLarge,
            WireError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            WireError::Malformed(_) | WireError::Invalid(_) => ErrorCode::Malformed,
            WireError::InvalidUpdate(e) => ErrorCode::from(e),
        }
    }
}
