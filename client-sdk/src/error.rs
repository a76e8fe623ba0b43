//! The SDK's public error type and the one place internal errors are converted into it.
