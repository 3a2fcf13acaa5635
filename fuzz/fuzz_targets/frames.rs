//! Camera frame conversion: MJPEG (scaled and full) and YUYV of arbitrary sizes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wae_edge::decode::{decode_frame, yuyv_to_rgb, FrameData};

fuzz_target!(|data: &[u8]| {
    let name = std::path::Path::new("fuzz-frame");
    let _ = decode_frame(FrameData::Mjpeg(data.to_vec()), Some((28, 28)), name);
    let _ = decode_frame(FrameData::Mjpeg(data.to_vec()), None, name);
    if data.len() >= 4 {
        let w = u16::from_le_bytes([data[0], data[1]]) as u32 % 1024;
        let h = u16::from_le_bytes([data[2], data[3]]) as u32 % 1024;
        let _ = yuyv_to_rgb(w, h, &data[4..]);
        let _ = decode_frame(FrameData::Yuyv { width: w, height: h, bytes: data[4..].to_vec() }, None, name);
    }
});
