//! IDX dataset parsing (image and label layouts).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = std::path::Path::new("fuzz.idx");
    let _ = wae_edge::dataset::parse_idx(data, 3, "images", p);
    let _ = wae_edge::dataset::parse_idx(data, 1, "labels", p);
});
