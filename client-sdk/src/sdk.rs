//! The app-facing API: one [`Sdk`] handle over the store, consent, signals, inference, rules and participation.
