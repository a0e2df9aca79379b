//! The `customws` binary: the tier with its built-in router.
fn main() {}
