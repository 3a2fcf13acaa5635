//! Image decoding with the size caps, then preprocessing of whatever decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = wae_edge::preprocess::decode_bytes(data, std::path::Path::new("fuzz")) {
        let cfg = wae_edge::config::preset("wae-fashion").expect("preset");
        let _ = wae_edge::preprocess::Preprocessor::new(&cfg).to_vec(&img);
    }
});
