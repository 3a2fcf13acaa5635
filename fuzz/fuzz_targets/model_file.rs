//! Model-file loader and header validation: any bytes give a model or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut f, data).expect("write");
    if let Ok(file) = wae_edge::weights::ModelFile::open(f.path()) {
        let _ = wae_edge::cpu::CpuNet::from_file(&file);
    }
});
