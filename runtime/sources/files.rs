//! Image files as a stream: one file, a directory or a glob, optionally looped. Files are read
//! here and decoded on the consumer's side, off the capture thread.

use std::path::PathBuf;
use std::time::Instant;

use super::{Frame, FrameSource, SourceError};
use crate::decode::FrameData;
use crate::preprocess::MAX_IMAGE_BYTES;

/// Reads the listed files in order.
pub struct FileSource {
    paths: Vec<PathBuf>,
    next: usize,
    index: u64,
    looped: bool,
}

impl FileSource {
    /// A source over `paths`; with `looped`, it starts again at the end.
    pub fn new(paths: Vec<PathBuf>, looped: bool) -> Self {
        FileSource {
            paths,
            next: 0,
            index: 0,
            looped,
        }
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.next >= self.paths.len() {
            if !self.looped || self.paths.is_empty() {
                return Ok(None);
            }
            self.next = 0;
        }
        let path = self.paths[self.next].clone();
        self.next += 1;
        let bytes = crate::regular_file::read_bounded(&path, MAX_IMAGE_BYTES).map_err(|cause| {
            SourceError::Io {
                path: path.clone(),
                cause,
            }
        })?;
        let f = Frame {
            index: self.index,
            captured: Instant::now(),
            pts: None,
            data: FrameData::Encoded(bytes),
            name: path,
        };
        self.index += 1;
        Ok(Some(f))
    }

    fn is_live(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!(
            "{} image file(s){}",
            self.paths.len(),
            if self.looped { ", looped" } else { "" }
        )
    }
}
