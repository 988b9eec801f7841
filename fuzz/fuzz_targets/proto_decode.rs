//! The supervisor decodes every worker message with `proto::decode`; workers are hostile.
//! Arbitrary bytes must decode to a validated message or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcmu_warden_proto::{FromWorker, Message, ToWorker, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<FromWorker>(data) {
        // Whatever decodes is valid and re-encodes.
        assert!(msg.validate().is_ok());
        assert!(encode(&msg).is_ok());
    }
    if let Ok(msg) = decode::<ToWorker>(data) {
        assert!(msg.validate().is_ok());
        assert!(encode(&msg).is_ok());
    }
});
