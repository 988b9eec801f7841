//! Fuzz target: an arbitrary byte string as a qcow2 image — header and L1
//! parsing, L2 lookup, compressed-cluster inflation — must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcmu_warden_qcow::Image;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::open(data.to_vec(), None) else {
        return;
    };
    let _ = img.backing_name();
    let size = img.header().size;
    let mut buf = vec![0u8; 8192];
    for off in [0, 4000, size / 2, size.saturating_sub(8192)] {
        let n = usize::try_from(size.saturating_sub(off).min(8192)).unwrap_or(0);
        if let Some(part) = buf.get_mut(..n) {
            let _ = img.read(part, off);
        }
    }
});
