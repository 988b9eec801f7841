//! libFuzzer target: [`tcmu_warden_supervisor::fuzz::control_request`] on arbitrary bytes (it must never
//! panic). Run with `RUSTC_BOOTSTRAP=1 cargo fuzz run supervisor_control` from the repository root.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tcmu_warden_supervisor::fuzz::control_request(data);
});
