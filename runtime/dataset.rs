//! Labelled image datasets: Fashion-MNIST in IDX form (gzip or raw) and image folders (one
//! sub-directory per class). Images are kept as u8 planes; training and evaluation normalise them
//! with the model's preprocessing.

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::config::{InputSpec, Preprocess, ResizeMode, FASHION_LABELS};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Largest IDX dimension product accepted (guards allocations from corrupt headers).
const MAX_IDX_BYTES: usize = 1 << 31;

/// Why a dataset cannot be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file cannot be opened or read.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// OS or gzip error.
        cause: std::io::Error,
    },
    /// The IDX magic number is not the expected one.
    #[error("{}: not an IDX {what} file (magic {got:#010x}, expected {expected:#010x})", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// "images" or "labels".
        what: &'static str,
        /// Magic found.
        got: u32,
        /// Magic expected.
        expected: u32,
    },
    /// The pictures at the training size would not fit the memory budget.
    #[error("{}: {images} pictures at {input} need {} MiB, over the {} MiB memory budget; lower --input, use fewer pictures, or raise --memory-budget", path.display(), needed >> 20, budget >> 20)]
    TooBig {
        /// The folder.
        path: PathBuf,
        /// Pictures found.
        images: usize,
        /// The training size, as `HxWxC`.
        input: InputSpec,
        /// Bytes the decoded pictures take.
        needed: u64,
        /// Bytes allowed.
        budget: u64,
    },
    /// Fewer bytes than the header promises, or more.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Which half of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Held-out test images.
    Test,
}

/// Images as u8 planes `[n, channels, height, width]` with class indices.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Pixel bytes, image after image, planar.
    pub pixels: Vec<u8>,
    /// Class of each image.
    pub labels: Vec<u8>,
    /// Channels per image.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Class names, index = class.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.channels * self.height * self.width;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Images per class, index = class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// Per-channel mean and standard deviation of `(pixel / 255 - mean[c]) / std[c]` over all
    /// images; with mean 0 and std 1, the normalisation the pictures themselves call for.
    pub fn channel_moments(&self, mean: &[f32], std: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let plane = self.height * self.width;
        let mut sums = vec![(0f64, 0f64); self.channels];
        for i in 0..self.len() {
            let img = self.image(i);
            for (ch, s) in sums.iter_mut().enumerate() {
                let (m, sd) = (f64::from(mean[ch]), f64::from(std[ch]));
                for &p in &img[ch * plane..(ch + 1) * plane] {
                    let x = (f64::from(p) / 255.0 - m) / sd;
                    s.0 += x;
                    s.1 += x * x;
                }
            }
        }
        let n = (self.len() * plane).max(1) as f64;
        let means = sums.iter().map(|s| (s.0 / n) as f32).collect();
        let stds = sums
            .iter()
            .map(|s| ((s.1 / n - (s.0 / n).powi(2)).max(0.0)).sqrt() as f32)
            .collect();
        (means, stds)
    }

    /// The images at `idx`, as a new dataset (e.g. a validation split).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            pixels: idx
                .iter()
                .flat_map(|&i| self.image(i).iter().copied())
                .collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            ..*self
        }
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DatasetError> {
    let io = |cause| DatasetError::Io {
        path: path.into(),
        cause,
    };
    let raw = crate::regular_file::read_bounded(path, MAX_IDX_BYTES as u64).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_IDX_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX file of unsigned bytes with `dims` dimensions; returns the dimensions and data.
pub fn parse_idx(
    bytes: &[u8],
    dims: usize,
    what: &'static str,
    path: &Path,
) -> Result<(Vec<usize>, Vec<u8>), DatasetError> {
    let corrupt = |reason: String| DatasetError::Corrupt {
        path: path.into(),
        reason,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(corrupt(format!(
            "truncated IDX header ({} bytes)",
            bytes.len()
        )));
    }
    let expected = 0x0800 | dims as u32;
    let magic = be_u32(bytes, 0);
    if magic != expected {
        return Err(DatasetError::BadMagic {
            path: path.into(),
            what,
            got: magic,
            expected,
        });
    }
    let shape: Vec<usize> = (0..dims)
        .map(|d| be_u32(bytes, 4 + 4 * d) as usize)
        .collect();
    let total = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&t| t <= MAX_IDX_BYTES);
    let Some(total) = total else {
        return Err(corrupt(format!("absurd IDX dimensions {shape:?}")));
    };
    let body = &bytes[header..];
    if body.len() != total {
        return Err(corrupt(format!(
            "IDX header {shape:?} promises {total} bytes of data, file has {}",
            body.len()
        )));
    }
    Ok((shape, body.to_vec()))
}

/// Reads an IDX image file (`[n, h, w]` u8) and its label file.
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<Dataset, DatasetError> {
    let (shape, pixels) = parse_idx(&read_maybe_gz(images)?, 3, "images", images)?;
    let (lshape, labels_v) = parse_idx(&read_maybe_gz(labels)?, 1, "labels", labels)?;
    if lshape[0] != shape[0] {
        return Err(DatasetError::Corrupt {
            path: labels.into(),
            reason: format!(
                "{} labels for {} images in {}",
                lshape[0],
                shape[0],
                images.display()
            ),
        });
    }
    let n_classes = labels_v.iter().copied().max().map_or(0, |m| m as usize + 1);
    let classes = if n_classes <= FASHION_LABELS.len() {
        FASHION_LABELS.iter().map(|s| s.to_string()).collect()
    } else {
        (0..n_classes).map(|i| format!("class_{i}")).collect()
    };
    Ok(Dataset {
        pixels,
        labels: labels_v,
        channels: 1,
        height: shape[1],
        width: shape[2],
        classes,
    })
}

/// Fashion-MNIST from a directory holding the four standard IDX files (gzipped or not).
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<Dataset, DatasetError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |kind: &str| {
        let base = dir.join(format!("{prefix}-{kind}"));
        let gz = dir.join(format!("{prefix}-{kind}.gz"));
        if gz.exists() {
            gz
        } else {
            base
        }
    };
    read_idx_pair(&find("images-idx3-ubyte"), &find("labels-idx1-ubyte"))
}

/// How image folders become pictures at the training size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderSpec {
    /// The size (and channels) every picture is resized to.
    pub input: InputSpec,
    /// How it is resized.
    pub resize: ResizeMode,
    /// Bytes the decoded pictures may take at most.
    pub budget: u64,
}

impl FolderSpec {
    /// A spec with the default memory budget ([`default_memory_budget`]).
    pub fn new(input: InputSpec, resize: ResizeMode) -> Self {
        FolderSpec {
            input,
            resize,
            budget: default_memory_budget(),
        }
    }
}

/// Half of the machine's physical memory: the rest is for the network, its activations and the
/// system. A dataset is decoded once into memory at the training size, so this bounds the cache.
pub fn default_memory_budget() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64).saturating_mul(size as u64) / 2
    } else {
        4 << 30
    }
}

/// Images from `dir/<class>/*.{png,jpg,jpeg}` (classes sorted by name), decoded in parallel with
/// the usual size caps and kept at the training size (channels converted as the model expects).
/// A folder whose pictures would not fit `spec.budget` is refused before anything is decoded.
pub fn image_folder(dir: &Path, spec: FolderSpec) -> Result<Dataset, DatasetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| DatasetError::Io { path, cause }
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() || classes.len() > 256 {
        return Err(DatasetError::Corrupt {
            path: dir.into(),
            reason: format!(
                "{} class directories; an image folder needs 1 to 256",
                classes.len()
            ),
        });
    }
    let input = spec.input;
    // Only the resize policy matters here: the dataset keeps 8-bit pixels.
    let pre = crate::preprocess::Preprocessor::from_parts(
        input,
        Preprocess {
            resize: spec.resize,
            mean: vec![0.0; input.channels],
            std: vec![1.0; input.channels],
        },
    );
    let mut files = Vec::new();
    for (label, class_dir) in classes.iter().enumerate() {
        let found =
            crate::sources::expand_inputs(std::slice::from_ref(class_dir)).map_err(|e| {
                DatasetError::Corrupt {
                    path: class_dir.clone(),
                    reason: e.to_string(),
                }
            })?;
        files.extend(found.into_iter().map(|f| (f, label as u8)));
    }
    let per_image = (input.channels * input.height * input.width) as u64;
    let needed = per_image.saturating_mul(files.len() as u64);
    if needed > spec.budget {
        return Err(DatasetError::TooBig {
            path: dir.into(),
            images: files.len(),
            input,
            needed,
            budget: spec.budget,
        });
    }
    let bar = indicatif::ProgressBar::new(files.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("decoding {pos}/{len} {bar:30} {elapsed}<{eta}")
            .expect("static template"),
    );
    // Decoding dominates loading a folder of photos; every core takes a share, each picture goes
    // straight to its place in the one buffer (so memory peaks at the budget, not twice it), and
    // the order (hence labels and seeds) does not depend on how many cores.
    let mut pixels = vec![0u8; needed as usize];
    pixels
        .par_chunks_mut(per_image as usize)
        .zip(files.par_iter())
        .try_for_each(|(dst, (f, _))| {
            let img = crate::preprocess::load_image(f).map_err(|e| DatasetError::Corrupt {
                path: f.clone(),
                reason: e.to_string(),
            })?;
            dst.copy_from_slice(&pre.planar_u8(&img));
            bar.inc(1);
            Ok::<(), DatasetError>(())
        })?;
    bar.finish_and_clear();
    let classes = classes
        .iter()
        .map(|p| {
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect();
    Ok(Dataset {
        pixels,
        labels: files.iter().map(|f| f.1).collect(),
        channels: input.channels,
        height: input.height,
        width: input.width,
        classes,
    })
}

/// A dataset directory of either layout: the four Fashion-MNIST IDX files, or `train/` and
/// `test/` image folders with one sub-directory per class (decoded per `spec`).
pub fn load(dir: &Path, split: Split, spec: FolderSpec) -> Result<Dataset, DatasetError> {
    let sub = match split {
        Split::Train => "train",
        Split::Test => "test",
    };
    if dir.join(sub).is_dir() {
        image_folder(&dir.join(sub), spec)
    } else {
        fashion_mnist(dir, split)
    }
}

/// True when `dir` holds image folders rather than IDX files.
pub fn is_image_folder(dir: &Path) -> bool {
    dir.join("train").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folders_load_sorted_classes_at_the_input_size() {
        let d = tempfile::tempdir().unwrap();
        for (class, n) in [("cat", 2), ("ant", 3)] {
            let cd = d.path().join("train").join(class);
            std::fs::create_dir_all(&cd).unwrap();
            for i in 0..n {
                image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10]))
                    .save(cd.join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let input = InputSpec {
            channels: 1,
            height: 28,
            width: 28,
        };
        let spec = FolderSpec::new(input, ResizeMode::Stretch);
        let ds = load(d.path(), Split::Train, spec).unwrap();
        assert_eq!(ds.classes, ["ant", "cat"]);
        assert_eq!(ds.labels, [0, 0, 0, 1, 1]);
        assert_eq!(
            (ds.channels, ds.height, ds.width, ds.image(4).len()),
            (1, 28, 28, 784)
        );
        std::fs::write(d.path().join("train/cat/bad.png"), b"garbage").unwrap();
        let e = load(d.path(), Split::Train, spec).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
        assert!(matches!(
            load(d.path(), Split::Test, spec),
            Err(DatasetError::Io { .. })
        ));
        // Six pictures of 784 bytes do not fit in 4 KB: refused before decoding.
        let small = FolderSpec {
            budget: 4096,
            ..spec
        };
        let e = load(d.path(), Split::Train, small).unwrap_err().to_string();
        assert!(
            e.contains("6 pictures at 28x28x1") && e.contains("memory budget"),
            "{e}"
        );
    }

    #[test]
    fn channel_moments_of_known_pictures() {
        // Channel 0 is 51 everywhere (0.2); channel 1 is half 0, half 255 (mean 0.5, std 0.5).
        let mut pixels = Vec::new();
        for _ in 0..3 {
            pixels.extend([51u8; 4]);
            pixels.extend([0u8, 255, 0, 255]);
        }
        let ds = Dataset {
            pixels,
            labels: vec![0, 0, 1],
            channels: 2,
            height: 2,
            width: 2,
            classes: vec!["a".into(), "b".into()],
        };
        let (m, s) = ds.channel_moments(&[0.0, 0.0], &[1.0, 1.0]);
        assert!(
            (m[0] - 0.2).abs() < 1e-6 && s[0].abs() < 1e-6,
            "{m:?} {s:?}"
        );
        assert!(
            (m[1] - 0.5).abs() < 1e-6 && (s[1] - 0.5).abs() < 1e-6,
            "{m:?} {s:?}"
        );
        // Under that normalisation the pictures have mean 0 and std 1.
        let (m, s) = ds.channel_moments(&[0.2, 0.5], &[1.0, 0.5]);
        assert!(
            m[1].abs() < 1e-6 && (s[1] - 1.0).abs() < 1e-6,
            "{m:?} {s:?}"
        );
        assert_eq!(ds.class_counts(), [2, 1]);
    }

    fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(body);
        v
    }

    #[test]
    fn parses_good_and_rejects_corrupt_idx() {
        let p = Path::new("x");
        let (s, d) = parse_idx(&idx(0x803, &[2, 2, 1], &[1, 2, 3, 4]), 3, "images", p).unwrap();
        assert_eq!((s, d), (vec![2, 2, 1], vec![1, 2, 3, 4]));
        let e = parse_idx(&idx(0x801, &[2, 2, 1], &[1, 2, 3, 4]), 3, "images", p).unwrap_err();
        assert!(
            matches!(e, DatasetError::BadMagic { got: 0x801, .. }),
            "{e}"
        );
        let e = parse_idx(&idx(0x803, &[2, 2, 2], &[1, 2, 3]), 3, "images", p).unwrap_err();
        assert!(e.to_string().contains("promises 8 bytes"), "{e}");
        assert!(parse_idx(&[0, 0, 8], 1, "labels", p).is_err());
        let e = parse_idx(
            &idx(0x803, &[u32::MAX, u32::MAX, u32::MAX], &[]),
            3,
            "images",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("absurd"), "{e}");
    }

    #[test]
    fn reads_gzipped_pairs_and_checks_counts() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let gz = |name: &str, bytes: Vec<u8>| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            std::fs::write(d.path().join(name), e.finish().unwrap()).unwrap();
        };
        gz(
            "t10k-images-idx3-ubyte.gz",
            idx(0x803, &[2, 1, 2], &[0, 255, 7, 7]),
        );
        gz("t10k-labels-idx1-ubyte.gz", idx(0x801, &[2], &[3, 9]));
        let ds = fashion_mnist(d.path(), Split::Test).unwrap();
        assert_eq!((ds.len(), ds.height, ds.width), (2, 1, 2));
        assert_eq!(ds.image(1), &[7, 7]);
        assert_eq!(ds.classes[9], "Ankle boot");
        gz("t10k-labels-idx1-ubyte.gz", idx(0x801, &[3], &[3, 9, 1]));
        assert!(fashion_mnist(d.path(), Split::Test)
            .unwrap_err()
            .to_string()
            .contains("3 labels for 2 images"));
        assert!(matches!(
            fashion_mnist(d.path(), Split::Train),
            Err(DatasetError::Io { .. })
        ));
    }
}
