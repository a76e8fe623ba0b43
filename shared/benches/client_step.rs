//! Criterion benchmark of the device training step (placeholder until written).
fn main() {}
