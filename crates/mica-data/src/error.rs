//! The one error type of the dataset crate. Every variant names the file it is about, so a CLI
//! can print it as a single line the user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The path the user gave does not exist.
    #[error("{}: no such file or folder", path.display())]
    NotFound { path: PathBuf },
    /// The user asked for something that cannot mean anything (a plain file where a dataset
    /// folder is needed, bad split ratios, ...). The CLI maps this to exit code 2.
    #[error("{}: {message}", path.display())]
    Usage { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The data itself is wrong: unknown layout, empty class folder, bad manifest, missing
    /// `.npz` key, undecodable image, DICOM without pixel data.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn usage(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Usage {
            path: path.into(),
            message: message.into(),
        }
    }

    /// True when the error is the caller's request rather than the data (CLI exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, DataError::NotFound { .. } | DataError::Usage { .. })
    }

    /// The reason without the path, for listing a skipped file next to its path.
    pub fn reason(&self) -> String {
        match self {
            DataError::NotFound { .. } => "file not found".into(),
            DataError::Usage { message, .. } | DataError::Invalid { message, .. } => message.clone(),
            DataError::Io { source, .. } => source.to_string(),
        }
    }
}
