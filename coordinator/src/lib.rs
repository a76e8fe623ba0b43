//! The fedrec coordinator: drives the shared round state machine for a population of devices (the QUIC server lands in its own issue).
