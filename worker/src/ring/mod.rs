//! # The TCMU command ring
//!
//! (Skeleton: the ring helper owns this module and replaces this text.)
