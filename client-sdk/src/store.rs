//! The sealed local store: interactions, user vector, cached model, consent — AEAD at rest, atomic writes, schema versions.
