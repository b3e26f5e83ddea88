//! Datasets as lists of samples. Pixels are loaded lazily by `mica-data`, so a dataset of
//! 20,000 X-rays costs a few megabytes until an image is actually needed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::labels::{LabelSet, Modality};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" | "testing" => Ok(Split::Test),
            other => Err(format!("unknown split `{other}` (expected train, val or test)")),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a sample's pixels live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageSource {
    /// An image or DICOM file.
    File { path: PathBuf },
    /// One image of an array inside a MedMNIST-style `.npz` file.
    Npz {
        path: PathBuf,
        array: String,
        index: usize,
    },
    /// Decoded 8-bit grayscale pixels held in memory (row-major, `width * height` bytes), e.g.
    /// a de-identified upload: the web app hands it to classifiers without writing a file, so
    /// nothing is left on disk if the process is killed. The pixels are not serialised; `name`
    /// only labels the source in errors and logs.
    Memory {
        name: String,
        width: u32,
        height: u32,
        #[serde(skip)]
        pixels: SharedPixels,
    },
}

/// Pixels shared between the case and every classifier that looks at it; cloning is cheap.
/// `Debug` prints the size only, so logging a sample never dumps an image.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SharedPixels(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for SharedPixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedPixels({} bytes)", self.0.len())
    }
}

impl ImageSource {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        ImageSource::File { path: path.into() }
    }

    /// An in-memory source of 8-bit grayscale pixels; `pixels.len()` must be
    /// `width * height` (checked when loaded).
    pub fn memory(name: impl Into<String>, width: u32, height: u32, pixels: std::sync::Arc<[u8]>) -> Self {
        ImageSource::Memory {
            name: name.into(),
            width,
            height,
            pixels: SharedPixels(pixels),
        }
    }

    /// The file the pixels come from (the `.npz` itself for array sources; the name of an
    /// in-memory source, which is no file).
    pub fn path(&self) -> &std::path::Path {
        match self {
            ImageSource::File { path } | ImageSource::Npz { path, .. } => path,
            ImageSource::Memory { name, .. } => std::path::Path::new(name.as_str()),
        }
    }
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Stable identifier: the path relative to the dataset root (or `file.npz:array[i]`). It is
    /// the key of split manifests, prediction logs and caches, so it must not depend on where
    /// the dataset is mounted.
    pub id: String,
    pub source: ImageSource,
    /// Index into the dataset's [`LabelSet`].
    pub label: usize,
    /// The split the layout or a split manifest assigned; `None` until split.
    pub split: Option<Split>,
    /// Free-text clinical context (age, sex, symptoms) when the dataset has it.
    pub context: Option<String>,
}

/// The dataset layouts mica recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    ImageFolder,
    /// Written as the CLI prints it; manifests from before this name still read (alias).
    #[serde(rename = "covid19-radiography", alias = "covid-radiography")]
    CovidRadiography,
    BrainTumorMri,
    ChestCt,
    CsvManifest,
    #[serde(rename = "medmnist-npz", alias = "med-mnist-npz")]
    MedMnistNpz,
    Dicom,
}

impl Layout {
    pub const ALL: [Layout; 7] = [
        Layout::ImageFolder,
        Layout::CovidRadiography,
        Layout::BrainTumorMri,
        Layout::ChestCt,
        Layout::CsvManifest,
        Layout::MedMnistNpz,
        Layout::Dicom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Layout::ImageFolder => "image-folder",
            Layout::CovidRadiography => "covid19-radiography",
            Layout::BrainTumorMri => "brain-tumor-mri",
            Layout::ChestCt => "chest-ct",
            Layout::CsvManifest => "csv-manifest",
            Layout::MedMnistNpz => "medmnist-npz",
            Layout::Dicom => "dicom",
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A file found in the dataset that could not be used, and why. Listed, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub modality: Modality,
    pub labels: LabelSet,
    pub samples: Vec<Sample>,
    pub skipped: Vec<SkippedFile>,
    /// The metadata columns whose values became the samples' clinical context.
    #[serde(default)]
    pub context_columns: Vec<String>,
    /// Of those, the ones that name or imply a class, let through only because the user said
    /// so (`--allow-label-like-context`): every figure of a run that uses them is stamped.
    #[serde(default)]
    pub label_like_context: Vec<String>,
}

impl Dataset {
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.split == Some(split))
    }

    pub fn count(&self, split: Option<Split>, label: usize) -> usize {
        self.samples
            .iter()
            .filter(|s| s.label == label && (split.is_none() || s.split == split))
            .count()
    }
}

#[cfg(test)]
mod layout_tests {
    use super::Layout;

    #[test]
    fn layouts_serialise_as_the_cli_prints_them() {
        for l in Layout::ALL {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(json, format!("\"{}\"", l.as_str()));
            assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), l);
        }
        // Manifests written before the names agreed still read.
        let old: Layout = serde_json::from_str("\"covid-radiography\"").unwrap();
        assert_eq!(old, Layout::CovidRadiography);
        let old: Layout = serde_json::from_str("\"med-mnist-npz\"").unwrap();
        assert_eq!(old, Layout::MedMnistNpz);
    }
}
