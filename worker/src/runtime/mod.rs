//! # Runtime (skeleton)
