//! Interaction events and how they become implicit feedback: weights per event kind and time decay.
