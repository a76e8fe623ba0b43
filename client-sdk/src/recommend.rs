//! Offline inference on the device: top-k recommendations, the user's segment, and explanations.
