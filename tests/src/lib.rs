//! End-to-end tests across the fedrec crates live in `tests/`; this library is empty on purpose.
