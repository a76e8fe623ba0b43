//! The error type of the data module.

use std::path::PathBuf;

/// Why a dataset could not be loaded, split or fetched.
///
/// Every message names the file involved, and the 1-based line when there is one. Messages
/// quote at most a short, truncated field of the data, never a whole line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a data file does not have the expected shape.
    #[error("{}:{line}: {reason}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// A data file holds no interactions.
    #[error("{}: no interactions found", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Downloading or unpacking a dataset failed.
    #[error("{0}")]
    Fetch(String),
    /// A downloaded file does not have the expected SHA-256 digest.
    #[error("{}: SHA-256 is {actual}, expected {expected}", .path.display())]
    Checksum {
        /// The downloaded file.
        path: PathBuf,
        /// The expected digest, lowercase hex.
        expected: String,
        /// The digest of the file, lowercase hex.
        actual: String,
    },
    /// A caller passed an unusable argument (a fraction out of range, the wrong source kind).
    #[error("{0}")]
    InvalidArgument(String),
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
