//! Context rules: a signed ruleset from the coordinator, verified and evaluated on the device, so context never leaves it.
