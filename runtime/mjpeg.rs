//! Motion-JPEG as USB webcams send it. The UVC payload format lets a frame leave out its Huffman
//! tables (no DHT segment) and assume the standard ones of JPEG Annex K.3; many webcams do, and
//! often without the JFIF or `AVI1` APP0 marker that tells a decoder so. Both JPEG decoders
//! wae-edge uses (jpeg-decoder for camera frames, zune-jpeg through the image crate for files)
//! fill in the standard tables when a frame carries an `AVI1` marker, so a frame without tables
//! gets that marker added before decoding: the decoders keep their own tables and nothing here
//! restates them.

use std::borrow::Cow;

/// Start of image.
const SOI: u8 = 0xD8;
/// Define Huffman tables.
const DHT: u8 = 0xC4;
/// Start of scan: the entropy-coded data follows, so no table can come after it.
const SOS: u8 = 0xDA;
/// APP0, where JFIF and `AVI1` live.
const APP0: u8 = 0xE0;

/// An APP0 segment with the `AVI1` identifier (AVI MJPEG, "standard Huffman tables").
const AVI1_SEGMENT: [u8; 9] = [0xFF, APP0, 0x00, 0x07, b'A', b'V', b'I', b'1', 0x00];

/// The JPEG as it is when it defines its Huffman tables or says it is MJPEG (or is not a JPEG
/// at all, or is malformed before its first scan: the decoder then reports the problem);
/// otherwise a copy with an `AVI1` marker after SOI, so the decoder uses the standard tables.
pub fn with_standard_tables(bytes: &[u8]) -> Cow<'_, [u8]> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        return Cow::Borrowed(bytes);
    }
    let mut i = 2;
    // Walks the marker segments up to the first scan; each step moves forward, so this ends.
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return Cow::Borrowed(bytes);
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => {
                i += 1;
                continue;
            }
            DHT => return Cow::Borrowed(bytes),
            SOS => break,
            // Markers without a length (TEM, RSTn).
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if len < 2 {
            return Cow::Borrowed(bytes);
        }
        let body = &bytes[i + 4..bytes.len().min(i + 2 + len)];
        if marker == APP0 && body.starts_with(b"AVI1") {
            return Cow::Borrowed(bytes);
        }
        i += 2 + len;
    }
    if i + 2 > bytes.len() || bytes[i + 1] != SOS {
        // No scan found: not a frame this can help.
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + AVI1_SEGMENT.len());
    out.extend_from_slice(&bytes[..2]);
    out.extend_from_slice(&AVI1_SEGMENT);
    out.extend_from_slice(&bytes[2..]);
    Cow::Owned(out)
}

/// The JPEG with its DHT and APP0 segments removed, as a webcam that relies on the standard
/// tables sends it (tests and fuzzing make such frames from ordinary JPEGs, whose encoder wrote
/// the standard tables). Anything that is not a well-formed JPEG up to its scan comes back as
/// it is.
pub fn strip_tables(bytes: &[u8]) -> Vec<u8> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        return bytes.to_vec();
    }
    let mut out = bytes[..2].to_vec();
    let mut i = 2;
    while i + 4 <= bytes.len() && bytes[i] == 0xFF && bytes[i + 1] != SOS {
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let end = (i + 2 + len).min(bytes.len());
        if !matches!(bytes[i + 1], DHT | APP0) {
            out.extend_from_slice(&bytes[i..end]);
        }
        i = end.max(i + 2);
    }
    out.extend_from_slice(&bytes[i.min(bytes.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    fn markers(bytes: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let mut i = 2;
        while i + 4 <= bytes.len() && bytes[1] == SOI {
            m.push(bytes[i + 1]);
            if bytes[i + 1] == SOS {
                break;
            }
            i += 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        }
        m
    }

    #[test]
    fn a_frame_without_tables_gets_the_mjpeg_marker_and_others_stay_as_they_are() {
        let full = jpeg(48, 32);
        assert!(markers(&full).contains(&DHT));
        assert!(matches!(with_standard_tables(&full), Cow::Borrowed(_)));
        let bare = strip_tables(&full);
        let m = markers(&bare);
        assert!(!m.contains(&DHT) && !m.contains(&APP0), "{m:x?}");
        let fixed = with_standard_tables(&bare);
        assert_eq!(&fixed[2..11], &AVI1_SEGMENT);
        // Already marked: left alone.
        assert!(matches!(with_standard_tables(&fixed), Cow::Borrowed(_)));
        for junk in [
            &b""[..],
            b"\xFF\xD8",
            b"\xFF\xD8\xFF\xE0\x00\x01",
            b"GIF89a",
            b"\xFF\xD8\x00",
        ] {
            assert!(matches!(with_standard_tables(junk), Cow::Borrowed(_)));
        }
    }

    /// Both decoders read the stripped frame as the original (same pixels).
    #[test]
    fn both_decoders_read_a_frame_without_tables() {
        let full = jpeg(64, 48);
        let want = image::load_from_memory(&full).unwrap().to_rgb8();
        let bare = strip_tables(&full);
        assert!(
            image::load_from_memory(&bare).is_err(),
            "the decoder needs help"
        );
        let fixed = with_standard_tables(&bare);
        let files = image::load_from_memory(&fixed).unwrap().to_rgb8();
        assert_eq!(files.as_raw(), want.as_raw());
        let mut dec = jpeg_decoder::Decoder::new(&fixed[..]);
        let camera = dec.decode().unwrap();
        let mut ref_dec = jpeg_decoder::Decoder::new(&full[..]);
        assert_eq!(camera, ref_dec.decode().unwrap());
    }
}
