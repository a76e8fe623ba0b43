//! The SDK's public error type and the one place internal errors are converted into it.
//!
//! Every public [`crate::sdk::Sdk`] method returns `Result<_, SdkError>`. Each variant has a
//! stable numeric [`SdkError::code`] (0 is reserved for success in the C ABI); codes are never
//! renumbered, new ones may be added. Messages name what failed, never the user's data (no
//! item ids, values, paths or keys).

use crate::net::NetError;
use crate::recommend::RecommendError;
use crate::rules::RulesError;
use crate::store::StoreError;

/// Why an SDK call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// An argument or a configuration value is invalid (code 1). The text names the field.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The user has not given the consent this call needs (code 2).
    #[error("consent required: {purpose}")]
    ConsentRequired {
        /// `"personalization"`, `"training"` or `"personalization or training"`.
        purpose: &'static str,
    },
    /// The store failed authentication (code 3). An AEAD cannot tell a wrong key from a
    /// tampered or corrupted file; both land here. Recover with `SdkConfig::recover` (moves
    /// the file aside) or [`crate::sdk::Sdk::erase`].
    #[error("the store could not be opened: wrong key, or the file was tampered with or corrupted")]
    WrongKeyOrCorrupt,
    /// The store file is structurally broken before authentication (truncated, not a fedrec
    /// store, over the size cap) or its authenticated contents are invalid (code 4).
    #[error("the store is corrupt: {0}")]
    StoreCorrupt(String),
    /// The store was written by a newer SDK (its format or schema version is unknown) (code 5).
    #[error("the store has version {found}; this SDK reads up to {supported}")]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
        /// The newest version this SDK reads.
        supported: u32,
    },
    /// Reading or writing the store failed (code 6); the previous good file is intact.
    #[error("store I/O failed: {0}")]
    StoreIo(String),
    /// Something would exceed a configured bound (memory budget, store size cap) (code 7).
    #[error("too large: {0}")]
    TooLarge(String),
    /// No model is installed yet: participate in a round or install one (code 8).
    #[error("no model is installed")]
    NoModel,
    /// The call needs configuration the SDK was opened without (code 9), e.g. a coordinator
    /// or a ruleset public key.
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
    /// The coordinator could not be reached, timed out, misbehaved or refused (code 10).
    #[error("network: {0}")]
    Network(String),
    /// The device is not eligible now (host-reported eligibility or the coordinator's
    /// policy) (code 11).
    #[error("not eligible to participate now")]
    NotEligible,
    /// The operation was cancelled by the host (code 12).
    #[error("cancelled")]
    Cancelled,
    /// A ruleset was refused: unsigned, tampered, signed by another key, or malformed (code 13).
    #[error("ruleset rejected: {0}")]
    RulesRejected(String),
    /// The handle was closed by [`crate::sdk::Sdk::forget`] (code 14).
    #[error("the SDK handle is closed (forget() was called)")]
    Closed,
    /// Another participation is already running on this handle (code 15).
    #[error("busy: a participation is already running")]
    Busy,
    /// A bug or an unexpected state inside the SDK (code 16).
    #[error("internal error: {0}")]
    Internal(String),
    /// Another open handle, in this process or another, holds the SDK folder (code 17). One
    /// folder has one handle at a time: share it between threads, or close it first.
    #[error("the SDK folder is in use by another open handle (this or another process)")]
    Locked,
    /// The store is older than the last one this SDK wrote in the folder (code 18): an older
    /// copy was put back, which could, for example, restore a withdrawn consent. The file is
    /// left untouched; `SdkConfig::recover` moves it aside and starts empty.
    #[error("the store was rolled back: {0}")]
    Rollback(String),
}

impl SdkError {
    /// The stable numeric code of this error (never 0; 0 means success in the C ABI).
    pub fn code(&self) -> i32 {
        match self {
            SdkError::InvalidArgument(_) => 1,
            SdkError::ConsentRequired { .. } => 2,
            SdkError::WrongKeyOrCorrupt => 3,
            SdkError::StoreCorrupt(_) => 4,
            SdkError::UnsupportedVersion { .. } => 5,
            SdkError::StoreIo(_) => 6,
            SdkError::TooLarge(_) => 7,
            SdkError::NoModel => 8,
            SdkError::NotConfigured(_) => 9,
            SdkError::Network(_) => 10,
            SdkError::NotEligible => 11,
            SdkError::Cancelled => 12,
            SdkError::RulesRejected(_) => 13,
            SdkError::Closed => 14,
            SdkError::Busy => 15,
            SdkError::Internal(_) => 16,
            SdkError::Locked => 17,
            SdkError::Rollback(_) => 18,
        }
    }
}

impl From<StoreError> for SdkError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::WrongKeyOrCorrupt => SdkError::WrongKeyOrCorrupt,
            StoreError::Truncated | StoreError::NotAStore | StoreError::Invalid(_) => {
                SdkError::StoreCorrupt(e.to_string())
            }
            StoreError::UnsupportedVersion { found, supported } => {
                SdkError::UnsupportedVersion { found, supported }
            }
            StoreError::TooLarge { .. } => SdkError::TooLarge(e.to_string()),
            StoreError::Io { .. } => SdkError::StoreIo(e.to_string()),
            StoreError::Crypto => SdkError::Internal(e.to_string()),
            StoreError::EmptyPath => {
                SdkError::InvalidArgument("dir must not be empty: give the SDK its own folder".into())
            }
            StoreError::Locked => SdkError::Locked,
            StoreError::NotAFile { .. } => SdkError::StoreCorrupt(e.to_string()),
            StoreError::Rollback { .. } | StoreError::CounterMissing { .. } => {
                SdkError::Rollback(e.to_string())
            }
        }
    }
}

impl From<NetError> for SdkError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Setup(_) => SdkError::Internal(e.to_string()),
            // The coordinator's message is operator text (never the user's data), kept short.
            _ => SdkError::Network(e.to_string()),
        }
    }
}

impl From<RecommendError> for SdkError {
    fn from(e: RecommendError) -> Self {
        match e {
            RecommendError::Solve(_) => SdkError::Internal(e.to_string()),
            _ => SdkError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<RulesError> for SdkError {
    fn from(e: RulesError) -> Self {
        match e {
            RulesError::UnknownSlot | RulesError::InvalidContext(_) => {
                SdkError::InvalidArgument(e.to_string())
            }
            _ => SdkError::RulesRejected(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_non_zero() {
        let all = [
            SdkError::InvalidArgument(String::new()),
            SdkError::ConsentRequired { purpose: "training" },
            SdkError::WrongKeyOrCorrupt,
            SdkError::StoreCorrupt(String::new()),
            SdkError::UnsupportedVersion { found: 2, supported: 1 },
            SdkError::StoreIo(String::new()),
            SdkError::TooLarge(String::new()),
            SdkError::NoModel,
            SdkError::NotConfigured(""),
            SdkError::Network(String::new()),
            SdkError::NotEligible,
            SdkError::Cancelled,
            SdkError::RulesRejected(String::new()),
            SdkError::Closed,
            SdkError::Busy,
            SdkError::Internal(String::new()),
            SdkError::Locked,
            SdkError::Rollback(String::new()),
        ];
        let mut codes: Vec<i32> = all.iter().map(SdkError::code).collect();
        assert!(codes.iter().all(|&c| c > 0));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
