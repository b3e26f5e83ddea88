//! Images that arrive as bytes (the web app's uploads) rather than as files of a dataset.
//!
//! An upload is untrusted: its name and declared type mean nothing, so its kind is decided by
//! the magic bytes alone, and only PNG, JPEG and DICOM are accepted. A DICOM upload carries
//! patient identifiers in its header; they are removed from the parsed object before anything
//! else reads it, so no later step (hashing, storing, logging, the page) can see them. Only the
//! names of the removed attributes are reported, never their values.

use std::io::Cursor;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::{OpenFileOptions, ReadPreamble};
use image::GrayImage;

use crate::image::{dicom_int, dicom_to_gray};

/// Largest accepted image side in pixels: a bigger header is far more likely a decompression
/// bomb than a radiograph.
pub const MAX_SIDE: u32 = 16_384;

/// What the magic bytes say an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadKind {
    Png,
    Jpeg,
    Dicom,
}

impl UploadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadKind::Png => "png",
            UploadKind::Jpeg => "jpeg",
            UploadKind::Dicom => "dicom",
        }
    }
}

/// Why an upload cannot be classified. Each message says what was wrong and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("the uploaded file is empty (0 bytes)")]
    Empty,
    #[error("not a PNG, JPEG or DICOM image: the content starts with {0} (the file's name and type are not trusted; its bytes are checked)")]
    NotAnImage(String),
    #[error("the DICOM file has no pixel data (no PixelData element; e.g. a structured report or a stripped header)")]
    NoPixelData,
    #[error("the image is {width}x{height} pixels; at most {MAX_SIDE} pixels per side are accepted")]
    TooLarge { width: u32, height: u32 },
    #[error("cannot decode the {kind}: {message}")]
    Undecodable { kind: &'static str, message: String },
}

/// A decoded upload: 8-bit grayscale pixels and what was learnt (and removed) on the way.
#[derive(Debug, Clone)]
pub struct DecodedUpload {
    pub kind: UploadKind,
    pub image: GrayImage,
    /// Frames in a multi-frame DICOM (1 otherwise); only the first is used.
    pub frames: u32,
    /// DICOM attributes removed before decoding, by keyword (e.g. `PatientName`), plus a
    /// count of private tags. Values are never kept.
    pub removed: Vec<String>,
    /// The DICOM Modality attribute (`CT`, `MR`, `CR`, `DX`), when present.
    pub dicom_modality: Option<String>,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Decides the kind of an upload by its magic bytes: PNG signature, JPEG SOI marker, or the
/// DICOM Part 10 `DICM` code after the 128-byte preamble.
pub fn sniff(bytes: &[u8]) -> Result<UploadKind, UploadError> {
    if bytes.is_empty() {
        return Err(UploadError::Empty);
    }
    if bytes.starts_with(PNG_MAGIC) {
        return Ok(UploadKind::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(UploadKind::Jpeg);
    }
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        return Ok(UploadKind::Dicom);
    }
    Err(UploadError::NotAnImage(describe_head(bytes)))
}

/// A short, safe description of the first bytes: printable ASCII is quoted (so "a text file"
/// is recognisable), anything else is shown as hex.
fn describe_head(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    if head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("\"{}\" (text?)", String::from_utf8_lossy(head))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// Attributes outside the patient group (0010,xxxx) that identify a person, a place or a
/// visit, or link the image back to the source study. Removed with the whole patient group and
/// every private tag (private vendors put names and IDs there too).
const IDENTIFYING: &[Tag] = &[
    tags::ACCESSION_NUMBER,
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::INSTITUTIONAL_DEPARTMENT_NAME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::REFERRING_PHYSICIAN_ADDRESS,
    tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
    tags::PHYSICIANS_OF_RECORD,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::OPERATORS_NAME,
    tags::REQUESTING_PHYSICIAN,
    tags::REFERENCED_PATIENT_SEQUENCE,
    tags::STATION_NAME,
    tags::DEVICE_SERIAL_NUMBER,
    tags::STUDY_ID,
    tags::STUDY_DATE,
    tags::SERIES_DATE,
    tags::ACQUISITION_DATE,
    tags::CONTENT_DATE,
    tags::STUDY_TIME,
    tags::SERIES_TIME,
    tags::ACQUISITION_TIME,
    tags::CONTENT_TIME,
    tags::INSTANCE_CREATION_DATE,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::FRAME_OF_REFERENCE_UID,
    tags::ADMISSION_ID,
    tags::CURRENT_PATIENT_LOCATION,
];

fn keyword(tag: Tag) -> String {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.alias().to_string())
        .unwrap_or_else(|| format!("({:04X},{:04X})", tag.group(), tag.element()))
}

/// Removes the patient group, the attributes in [`IDENTIFYING`] and all private tags from a
/// parsed DICOM object; returns what was removed (keywords; private tags as one count).
pub fn deidentify(obj: &mut dicom_object::DefaultDicomObject) -> Vec<String> {
    let doomed: Vec<Tag> = obj
        .tags()
        .filter(|t| t.group() == 0x0010 || t.group() % 2 == 1 || IDENTIFYING.contains(t))
        .collect();
    let mut removed = Vec::new();
    let mut private = 0usize;
    for t in doomed {
        if obj.remove_element(t) {
            if t.group() % 2 == 1 {
                private += 1;
            } else {
                removed.push(keyword(t));
            }
        }
    }
    if private > 0 {
        removed.push(format!("{private} private tag(s)"));
    }
    removed
}

/// Sniffs, de-identifies (DICOM) and decodes an upload to 8-bit grayscale, the same pixels
/// [`crate::image::load_gray`] would give for the same file on disk.
pub fn decode_upload(bytes: &[u8]) -> Result<DecodedUpload, UploadError> {
    let kind = sniff(bytes)?;
    match kind {
        UploadKind::Png | UploadKind::Jpeg => {
            let format = if kind == UploadKind::Png {
                image::ImageFormat::Png
            } else {
                image::ImageFormat::Jpeg
            };
            let undecodable = |e: image::ImageError| UploadError::Undecodable {
                kind: kind.as_str(),
                message: e.to_string(),
            };
            let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
            let mut limits = image::Limits::default();
            limits.max_image_width = Some(MAX_SIDE);
            limits.max_image_height = Some(MAX_SIDE);
            reader.limits(limits);
            let (w, h) = image::ImageReader::with_format(Cursor::new(bytes), format)
                .into_dimensions()
                .map_err(undecodable)?;
            if w > MAX_SIDE || h > MAX_SIDE {
                return Err(UploadError::TooLarge { width: w, height: h });
            }
            let img = reader.decode().map_err(undecodable)?;
            Ok(DecodedUpload {
                kind,
                image: img.to_luma8(),
                frames: 1,
                removed: Vec::new(),
                dicom_modality: None,
            })
        }
        UploadKind::Dicom => {
            let mut obj = OpenFileOptions::new()
                .read_preamble(ReadPreamble::Always)
                .from_reader(Cursor::new(bytes))
                .map_err(|e| UploadError::Undecodable {
                    kind: "DICOM file",
                    message: e.to_string(),
                })?;
            // Identifiers go first: nothing below (not even an error message) reads them.
            let removed = deidentify(&mut obj);
            if !matches!(obj.element_opt(tags::PIXEL_DATA), Ok(Some(_))) {
                return Err(UploadError::NoPixelData);
            }
            let width = dicom_int(&obj, tags::COLUMNS).unwrap_or(0);
            let height = dicom_int(&obj, tags::ROWS).unwrap_or(0);
            if width == 0 || height == 0 {
                return Err(UploadError::Undecodable {
                    kind: "DICOM file",
                    message: "it lacks Rows/Columns".into(),
                });
            }
            if width > MAX_SIDE || height > MAX_SIDE {
                return Err(UploadError::TooLarge { width, height });
            }
            let dicom_modality = obj
                .element_opt(tags::MODALITY)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            let (image, frames) = dicom_to_gray(&obj, std::path::Path::new("upload"))
                .map_err(|e| UploadError::Undecodable {
                    kind: "DICOM file",
                    message: e.reason(),
                })?;
            Ok(DecodedUpload {
                kind,
                image,
                frames,
                removed,
                dicom_modality,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn sniffing_goes_by_content_not_name() {
        assert_eq!(sniff(&[]), Err(UploadError::Empty));
        let png = crate::image::png_bytes(&GrayImage::new(3, 2));
        assert_eq!(sniff(&png), Ok(UploadKind::Png));
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]), Ok(UploadKind::Jpeg));
        let e = sniff(b"hello, I am a text file called x.png").unwrap_err().to_string();
        assert!(e.contains("not a PNG, JPEG or DICOM") && e.contains("\"hello, I\""), "{e}");
        // GIF is an image, but not one mica accepts.
        assert!(matches!(sniff(b"GIF89a\x01\x00"), Err(UploadError::NotAnImage(_))));
        let dcm = std::fs::read(fixture("CT_small.dcm")).unwrap();
        assert_eq!(sniff(&dcm), Ok(UploadKind::Dicom));
    }

    #[test]
    fn dicom_upload_decodes_like_the_file_and_loses_its_patient_fields() {
        let path = fixture("CT_small.dcm");
        let bytes = std::fs::read(&path).unwrap();
        let original = dicom_object::open_file(&path).unwrap();
        let name = original.element(tags::PATIENT_NAME).unwrap().to_str().unwrap().to_string();
        assert!(!name.is_empty());
        let d = decode_upload(&bytes).unwrap();
        assert_eq!(d.kind, UploadKind::Dicom);
        assert!(d.removed.iter().any(|r| r == "PatientName"), "{:?}", d.removed);
        assert!(d.removed.iter().any(|r| r == "PatientID"), "{:?}", d.removed);
        assert!(d.removed.iter().all(|r| !r.contains(&name)));
        assert_eq!(d.dicom_modality.as_deref(), Some("CT"));
        let from_file = crate::image::load_gray(&mica_core::ImageSource::file(&path)).unwrap();
        assert_eq!(d.image, from_file);
    }

    #[test]
    fn pixelless_and_truncated_uploads_are_refused_with_reasons() {
        let bytes = std::fs::read(fixture("CT_small_no_pixels.dcm")).unwrap();
        assert_eq!(decode_upload(&bytes).unwrap_err(), UploadError::NoPixelData);
        let png = crate::image::png_bytes(&GrayImage::from_fn(64, 64, |x, y| image::Luma([(x ^ y) as u8])));
        let e = decode_upload(&png[..png.len() / 2]).unwrap_err();
        assert!(matches!(e, UploadError::Undecodable { kind: "png", .. }), "{e}");
    }
}
