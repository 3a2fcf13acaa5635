//! Where frames come from. For `classify`: files, directories and globs expanded into a sorted
//! list of image paths, the way jetson-inference takes `"*.jpg"` or a directory.

use std::path::{Path, PathBuf};

/// Extensions taken from a directory (explicit files are decoded whatever their name).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Why an input argument gives no images.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Not a file, not a directory, no glob match.
    #[error("{}: no such file or directory", .0.display())]
    NotFound(PathBuf),
    /// A glob that matched nothing.
    #[error("{0}: no files match this pattern")]
    NoMatch(String),
    /// A malformed glob.
    #[error("{0}: bad glob pattern: {1}")]
    BadPattern(String, String),
    /// A directory that cannot be listed.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// OS error.
        cause: std::io::Error,
    },
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Expands files, directories (their images, sorted) and globs (sorted) into image paths.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let io = |cause| InputError::Io {
                path: input.clone(),
                cause,
            };
            let mut found = Vec::new();
            for entry in std::fs::read_dir(input).map_err(io)? {
                let path = entry.map_err(io)?.path();
                if path.is_file() && is_image(&path) {
                    found.push(path);
                }
            }
            found.sort();
            out.extend(found);
        } else if input.exists() {
            out.push(input.clone());
        } else if let Some(pattern) = input.to_str().filter(|s| s.contains(['*', '?', '['])) {
            let paths = glob::glob(pattern)
                .map_err(|e| InputError::BadPattern(pattern.into(), e.msg.into()))?;
            let mut found: Vec<PathBuf> = paths
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            if found.is_empty() {
                return Err(InputError::NoMatch(pattern.into()));
            }
            found.sort();
            out.extend(found);
        } else {
            return Err(InputError::NotFound(input.clone()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_globs_and_files() {
        let d = tempfile::tempdir().unwrap();
        for n in ["b.png", "a.JPG", "notes.txt"] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        let got = expand_inputs(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.JPG", "b.png"]);
        let glob = d.path().join("*.png");
        assert_eq!(expand_inputs(&[glob]).unwrap().len(), 1);
        let txt = d.path().join("notes.txt");
        assert_eq!(
            expand_inputs(std::slice::from_ref(&txt)).unwrap(),
            vec![txt]
        );
        assert!(matches!(
            expand_inputs(&[d.path().join("*.gif")]),
            Err(InputError::NoMatch(_))
        ));
        assert!(matches!(
            expand_inputs(&[d.path().join("missing.png")]),
            Err(InputError::NotFound(_))
        ));
    }
}
