//! Images that arrive as bytes (the web app's uploads) rather than as files of a dataset.
//!
//! An upload is untrusted: its name and declared type mean nothing, so its kind is decided by
//! the magic bytes alone, and only PNG, JPEG and DICOM are accepted. A DICOM upload carries
//! patient identifiers in its header; they are removed from the parsed object before anything
//! else reads it, so no later step (hashing, storing, logging, the page) can see them. Only the
//! names of the removed attributes are reported, never their values.
//!
//! An upload also cannot decide how much memory decoding it takes: DICOM is read through
//! [`crate::dicom_read`] (transfer syntax checked from the file meta first, deflated data
//! inflated under a cap, declared lengths checked before the parser allocates them), and the
//! decoded size of every image is checked from its header against [`UploadLimits`] before any
//! pixel is decoded.

use std::io::Cursor;
use std::sync::Arc;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use image::GrayImage;
use sha2::{Digest, Sha256};

use crate::deid::{DeidAction, UidRemapper};
use crate::image::{dicom_int, dicom_to_gray};

/// Largest accepted image side in pixels by default: a bigger header is far more likely a
/// decompression bomb than a radiograph (a full-field mammogram is about 4000 x 5000).
pub const MAX_SIDE: u32 = 8_192;

/// Memory bounds for decoding one untrusted upload. Every check happens before the memory it
/// guards is allocated; [`UploadLimits::default`] is what `mica serve` uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadLimits {
    /// Longest accepted side in pixels (default [`MAX_SIDE`]).
    pub max_side: u32,
    /// Decoded bytes of the one frame that is decoded: rows x columns x samples per pixel x
    /// bits allocated / 8 for DICOM, width x height x channels x bytes per channel for PNG and
    /// JPEG (default 64 MiB).
    pub max_frame_bytes: u64,
    /// The same over all frames a DICOM declares (default 256 MiB); only the first is decoded,
    /// but a header claiming more is not a plausible clinical image.
    pub max_total_pixel_bytes: u64,
    /// Size a Deflated Explicit VR Little Endian dataset may inflate to (default 64 MiB).
    pub max_inflated_bytes: u64,
    /// Data elements plus values of multi-valued text elements in a DICOM dataset, nested ones
    /// included (default 500,000; a CT header has a few hundred).
    pub max_values: u64,
    /// Sequence nesting depth (default 16).
    pub max_depth: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_side: MAX_SIDE,
            max_frame_bytes: 64 << 20,
            max_total_pixel_bytes: 256 << 20,
            max_inflated_bytes: 64 << 20,
            max_values: 500_000,
            max_depth: 16,
        }
    }
}

/// Which limit of [`UploadLimits`] an upload broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// `max_frame_bytes`.
    FrameBytes,
    /// `max_total_pixel_bytes`.
    TotalPixelBytes,
    /// `max_inflated_bytes`.
    InflatedBytes,
    /// `max_values`.
    Values,
    /// `max_depth`.
    Depth,
    /// A DICOM element declares more bytes than the file holds (the parser would allocate them).
    ElementLength,
    /// A compressed frame inside a DICOM declares other dimensions than Rows/Columns.
    CodestreamSize,
}

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
    #[error("the image is {width}x{height} pixels; at most {max_side} pixels per side are accepted")]
    TooLarge { width: u32, height: u32, max_side: u32 },
    #[error("cannot decode the {kind}: {message}")]
    Undecodable { kind: &'static str, message: String },
    /// The DICOM transfer syntax is unknown, or its pixel data cannot be decoded here.
    #[error("the DICOM transfer syntax {uid}{} is not supported; accepted: uncompressed (implicit or explicit VR), deflated, RLE, JPEG baseline/extended/lossless and JPEG 2000", name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
    UnsupportedTransferSyntax { uid: String, name: Option<String> },
    /// A memory bound of [`UploadLimits`] was hit before the memory was allocated.
    #[error("the upload was refused before decoding: {message}")]
    LimitExceeded { limit: LimitKind, message: String },
}

/// A decoded upload: 8-bit grayscale pixels and what was learnt (and removed) on the way.
#[derive(Debug, Clone)]
pub struct DecodedUpload {
    pub kind: UploadKind,
    /// The de-identified first frame, 8-bit gray (DICOM: modality and VOI LUT applied).
    pub image: GrayImage,
    /// Frames in a multi-frame DICOM (1 otherwise); only the first is used.
    pub frames: u32,
    /// Keywords of the attributes de-identification touched (any action), plus
    /// `"N private tag(s)"`; kept for callers of the first API, [`Self::deidentified`] says more.
    pub removed: Vec<String>,
    /// The DICOM Modality attribute (`CT`, `MR`, `CR`, `DX`), when present.
    pub dicom_modality: Option<String>,
    /// What PS3.15 Basic Profile de-identification did, attribute by attribute (empty for
    /// PNG/JPEG).
    pub deidentified: Vec<DeidAction>,
    /// BurnedInAnnotation (0028,0301): `Some(true)` for `YES`, `Some(false)` for `NO`, `None`
    /// when absent or anything else. Text burned into pixels survives de-identification, so
    /// `Some(true)` must keep the image on this machine.
    pub burned_in_annotation: Option<bool>,
    /// BodyPartExamined (0018,0015), trimmed, when present (for task routing).
    pub body_part: Option<String>,
    /// The DICOM file's Transfer Syntax UID as uploaded.
    pub transfer_syntax: Option<String>,
    /// [`pixel_sha256`] of [`Self::image`]: the decoded, de-identified pixels.
    pub pixel_sha256: String,
}

impl DecodedUpload {
    /// The pixels as an in-memory image source for classifiers (no file is written).
    pub fn memory_source(&self, name: impl Into<String>) -> mica_core::ImageSource {
        mica_core::ImageSource::memory(
            name,
            self.image.width(),
            self.image.height(),
            Arc::from(self.image.as_raw().as_slice()),
        )
    }
}

/// Lower-case hex SHA-256 of decoded pixels, defined over bytes that do not depend on any
/// encoder: width, height, channels and bits per sample, each as a little-endian `u32`,
/// followed by the samples in row-major order (interleaved channels; samples wider than 8
/// bits little-endian). For mica's 8-bit gray images: `w, h, 1, 8` then `w * h` bytes.
pub fn pixel_sha256_raw(width: u32, height: u32, channels: u32, bits: u32, samples: &[u8]) -> String {
    let mut h = Sha256::new();
    for v in [width, height, channels, bits] {
        h.update(v.to_le_bytes());
    }
    h.update(samples);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`pixel_sha256_raw`] of an 8-bit gray image.
pub fn pixel_sha256(img: &GrayImage) -> String {
    pixel_sha256_raw(img.width(), img.height(), 1, 8, img.as_raw())
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

/// Applies the PS3.15 Basic Profile (see [`crate::deid`]) to a parsed DICOM object, nested
/// sequences and file meta included; returns the keywords touched (private tags as one count).
pub fn deidentify(obj: &mut dicom_object::DefaultDicomObject) -> Vec<String> {
    removed_keywords(&crate::deid::deidentify_file(obj, UidRemapper::process()))
}

fn removed_keywords(actions: &[DeidAction]) -> Vec<String> {
    actions
        .iter()
        .map(|a| {
            if a.tag == "private" {
                format!("{} private tag(s)", a.count)
            } else {
                a.keyword.clone()
            }
        })
        .collect()
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches('\0').trim().to_string())
        .filter(|s| !s.is_empty())
}

/// [`decode_upload_with`] under [`UploadLimits::default`].
pub fn decode_upload(bytes: &[u8]) -> Result<DecodedUpload, UploadError> {
    decode_upload_with(bytes, &UploadLimits::default())
}

/// Sniffs, bounds, de-identifies (DICOM) and decodes an upload to 8-bit grayscale, the same
/// pixels [`crate::image::load_gray`] would give for the same file on disk. Nothing is written
/// to disk. Every size is checked against `limits` before the memory it implies is allocated.
pub fn decode_upload_with(bytes: &[u8], limits: &UploadLimits) -> Result<DecodedUpload, UploadError> {
    let kind = sniff(bytes)?;
    match kind {
        UploadKind::Png | UploadKind::Jpeg => decode_raster(bytes, kind, limits),
        UploadKind::Dicom => decode_dicom(bytes, limits),
    }
}

fn decode_raster(bytes: &[u8], kind: UploadKind, limits: &UploadLimits) -> Result<DecodedUpload, UploadError> {
    use image::ImageDecoder;
    let format = if kind == UploadKind::Png {
        image::ImageFormat::Png
    } else {
        image::ImageFormat::Jpeg
    };
    let undecodable = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => UploadError::LimitExceeded {
            limit: LimitKind::FrameBytes,
            message: format!("the {} decoder's memory limit: {l}", kind.as_str()),
        },
        e => UploadError::Undecodable {
            kind: kind.as_str(),
            message: e.to_string(),
        },
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    // Sides are checked below with a clearer error; the allocation bound also covers what the
    // decoder buffers besides the image (e.g. compressed PNG text chunks).
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_frame_bytes.saturating_mul(2));
    reader.limits(decoder_limits);
    let decoder = reader.into_decoder().map_err(undecodable)?;
    let (w, h) = decoder.dimensions();
    if w > limits.max_side || h > limits.max_side {
        return Err(UploadError::TooLarge {
            width: w,
            height: h,
            max_side: limits.max_side,
        });
    }
    if decoder.total_bytes() > limits.max_frame_bytes {
        return Err(UploadError::LimitExceeded {
            limit: LimitKind::FrameBytes,
            message: format!(
                "the {w}x{h} {} would decode to {} bytes; at most {} are accepted",
                kind.as_str(),
                decoder.total_bytes(),
                limits.max_frame_bytes
            ),
        });
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    let image = img.to_luma8();
    Ok(DecodedUpload {
        kind,
        pixel_sha256: pixel_sha256(&image),
        image,
        frames: 1,
        removed: Vec::new(),
        dicom_modality: None,
        deidentified: Vec::new(),
        burned_in_annotation: None,
        body_part: None,
        transfer_syntax: None,
    })
}

/// A DICOM upload parsed within `limits` and de-identified (PS3.15 Basic Profile, nested
/// sequences and file meta included), pixels not yet decoded.
#[derive(Debug, Clone)]
pub struct DeidentifiedDicom {
    /// The de-identified object; its file meta names the transfer syntax of the dataset as
    /// held (Explicit VR Little Endian for an upload that was deflated).
    pub object: dicom_object::DefaultDicomObject,
    pub deidentified: Vec<DeidAction>,
    /// Read before de-identification (none of them identifies anyone).
    pub modality: Option<String>,
    pub body_part: Option<String>,
    pub burned_in_annotation: Option<bool>,
    /// The Transfer Syntax UID as uploaded.
    pub transfer_syntax: String,
}

/// Parses (within `limits`) and de-identifies a DICOM upload without decoding its pixels, e.g.
/// to inspect or re-serialise what is left.
pub fn read_deidentified_dicom(bytes: &[u8], limits: &UploadLimits) -> Result<DeidentifiedDicom, UploadError> {
    if sniff(bytes)? != UploadKind::Dicom {
        return Err(UploadError::Undecodable {
            kind: "DICOM file",
            message: "not a DICOM Part 10 file (no DICM code after the preamble)".into(),
        });
    }
    let (mut obj, transfer_syntax) = crate::dicom_read::parse_bounded(bytes, limits)?;
    // Routing facts and the burned-in flag are read first; none of them identifies anyone.
    let modality = text(&obj, tags::MODALITY);
    let body_part = text(&obj, tags::BODY_PART_EXAMINED);
    let burned_in_annotation = text(&obj, tags::BURNED_IN_ANNOTATION).and_then(|s| match s.to_ascii_uppercase().as_str() {
        "YES" => Some(true),
        "NO" => Some(false),
        _ => None,
    });
    let deidentified = crate::deid::deidentify_file(&mut obj, UidRemapper::process());
    Ok(DeidentifiedDicom {
        object: obj,
        deidentified,
        modality,
        body_part,
        burned_in_annotation,
        transfer_syntax,
    })
}

fn decode_dicom(bytes: &[u8], limits: &UploadLimits) -> Result<DecodedUpload, UploadError> {
    // Identifiers go first: nothing below (not even an error message) reads them.
    let DeidentifiedDicom {
        object: obj,
        deidentified,
        modality: dicom_modality,
        body_part,
        burned_in_annotation,
        transfer_syntax,
    } = read_deidentified_dicom(bytes, limits)?;
    let removed = removed_keywords(&deidentified);
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
    if width > limits.max_side || height > limits.max_side {
        return Err(UploadError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    let samples = u64::from(dicom_int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1));
    let bits = u64::from(dicom_int(&obj, tags::BITS_ALLOCATED).unwrap_or(16).max(1));
    let frames = dicom_int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let frame_bytes = (u64::from(width) * u64::from(height) * samples * bits).div_ceil(8);
    if frame_bytes > limits.max_frame_bytes {
        return Err(UploadError::LimitExceeded {
            limit: LimitKind::FrameBytes,
            message: format!(
                "a {width}x{height} frame with {samples} sample(s) of {bits} bits is {frame_bytes} bytes; at most {} are accepted",
                limits.max_frame_bytes
            ),
        });
    }
    let total = frame_bytes.saturating_mul(u64::from(frames));
    if total > limits.max_total_pixel_bytes {
        return Err(UploadError::LimitExceeded {
            limit: LimitKind::TotalPixelBytes,
            message: format!(
                "{frames} frames of {frame_bytes} bytes are {total} bytes of pixel data; at most {} are accepted",
                limits.max_total_pixel_bytes
            ),
        });
    }
    check_codestream(&obj, width, height)?;
    let (image, frames) = dicom_to_gray(&obj, std::path::Path::new("upload")).map_err(|e| UploadError::Undecodable {
        kind: "DICOM file",
        message: e.reason(),
    })?;
    Ok(DecodedUpload {
        kind: UploadKind::Dicom,
        pixel_sha256: pixel_sha256(&image),
        image,
        frames,
        removed,
        dicom_modality,
        deidentified,
        burned_in_annotation,
        body_part,
        transfer_syntax: Some(transfer_syntax),
    })
}

/// A compressed frame's codestream carries its own dimensions, which the JPEG and JPEG 2000
/// decoders allocate by; they must not exceed Rows x Columns, which were checked.
fn check_codestream(obj: &dicom_object::DefaultDicomObject, width: u32, height: u32) -> Result<(), UploadError> {
    let Some(first) = obj
        .element_opt(tags::PIXEL_DATA)
        .ok()
        .flatten()
        .and_then(|e| e.fragments())
        .and_then(|f| f.first())
    else {
        return Ok(());
    };
    let dims = codestream_dimensions(first);
    match dims {
        Some((w, h)) if w > width || h > height => Err(UploadError::LimitExceeded {
            limit: LimitKind::CodestreamSize,
            message: format!("a compressed frame declares {w}x{h} pixels but the header says {width}x{height}"),
        }),
        _ => Ok(()),
    }
}

/// Width and height from a JPEG SOF segment or a JPEG 2000 SIZ segment at the start of `b`.
pub(crate) fn codestream_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let be16 = |i: usize| b.get(i..i + 2).map(|s| u32::from(u16::from_be_bytes([s[0], s[1]])));
    let be32 = |i: usize| b.get(i..i + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    if b.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        // J2K: SOC, SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz.
        let (x, y, xo, yo) = (be32(8)?, be32(12)?, be32(16)?, be32(20)?);
        return Some((x.saturating_sub(xo), y.saturating_sub(yo)));
    }
    if !b.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = be16(i + 2)? as usize;
        let sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if sof {
            return Some((be16(i + 7)?, be16(i + 5)?));
        }
        if marker == 0xDA {
            return None;
        }
        i += 2 + len;
    }
    None
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

    /// One explicit VR little endian element.
    fn el(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(group.to_le_bytes());
        v.extend(element.to_le_bytes());
        v.extend(vr);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            v.extend([0, 0]);
            v.extend((value.len() as u32).to_le_bytes());
        } else {
            v.extend((value.len() as u16).to_le_bytes());
        }
        v.extend(value);
        v
    }

    fn even(s: &str) -> Vec<u8> {
        let mut b = s.as_bytes().to_vec();
        if b.len() % 2 == 1 {
            b.push(if s.starts_with(|c: char| c.is_ascii_digit()) { 0 } else { b' ' });
        }
        b
    }

    /// Preamble, DICM and a file meta group naming `ts`, then `dataset` as given.
    fn part10(ts: &str, dataset: &[u8]) -> Vec<u8> {
        let mut group = Vec::new();
        group.extend(el(0x0002, 0x0001, b"OB", &[0, 1]));
        group.extend(el(0x0002, 0x0002, b"UI", &even("1.2.840.10008.5.1.4.1.1.7")));
        group.extend(el(0x0002, 0x0003, b"UI", &even("1.2.826.0.1.3680043.2.1143.99")));
        group.extend(el(0x0002, 0x0010, b"UI", &even(ts)));
        let mut f = vec![0u8; 128];
        f.extend(b"DICM");
        f.extend(el(0x0002, 0x0000, b"UL", &(group.len() as u32).to_le_bytes()));
        f.extend(group);
        f.extend(dataset);
        f
    }

    /// A 4x4 8-bit MONOCHROME2 image dataset with a patient name, pixel values 0..=255.
    fn small_image_dataset() -> (Vec<u8>, GrayImage) {
        let img = GrayImage::from_fn(4, 4, |x, y| image::Luma([((y * 4 + x) * 17) as u8]));
        let mut d = Vec::new();
        d.extend(el(0x0008, 0x0016, b"UI", &even("1.2.840.10008.5.1.4.1.1.7")));
        d.extend(el(0x0008, 0x0018, b"UI", &even("1.2.826.0.1.3680043.2.1143.99")));
        d.extend(el(0x0008, 0x0060, b"CS", &even("OT")));
        d.extend(el(0x0010, 0x0010, b"PN", &even("Doe^Jane")));
        d.extend(el(0x0028, 0x0002, b"US", &1u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0004, b"CS", &even("MONOCHROME2")));
        d.extend(el(0x0028, 0x0010, b"US", &4u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0011, b"US", &4u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0100, b"US", &8u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0101, b"US", &8u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0102, b"US", &7u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0103, b"US", &0u16.to_le_bytes()));
        d.extend(el(0x0028, 0x0301, b"CS", &even("YES")));
        d.extend(el(0x7FE0, 0x0010, b"OB", img.as_raw()));
        (d, img)
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

    #[test]
    fn a_deflated_dicom_decodes_like_its_explicit_twin_and_reports_burned_in_text() {
        let (ds, img) = small_image_dataset();
        let plain = decode_upload(&part10(EXPLICIT_LE, &ds)).unwrap();
        let deflated = decode_upload(&part10(DEFLATED, &deflate(&ds))).unwrap();
        assert_eq!(plain.image, img);
        assert_eq!(deflated.image, img);
        assert_eq!(deflated.transfer_syntax.as_deref(), Some(DEFLATED));
        assert_eq!(deflated.burned_in_annotation, Some(true));
        assert_eq!(deflated.dicom_modality.as_deref(), Some("OT"));
        assert!(deflated.deidentified.iter().any(|a| a.keyword == "PatientName" && a.action == crate::deid::DeidCode::Emptied));
        assert!(deflated.deidentified.iter().any(|a| a.keyword == "MediaStorageSOPInstanceUID"));
        // The hash is of pixels, not of a container: the PNG of the same pixels hashes alike.
        let png = decode_upload(&crate::image::png_bytes(&img)).unwrap();
        assert_eq!(png.pixel_sha256, plain.pixel_sha256);
        assert_eq!(png.burned_in_annotation, None);
    }

    #[test]
    fn pixel_hash_covers_size_and_samples_in_the_documented_layout() {
        let img = GrayImage::from_raw(2, 1, vec![5, 9]).unwrap();
        let mut bytes = Vec::new();
        for v in [2u32, 1, 1, 8] {
            bytes.extend(v.to_le_bytes());
        }
        bytes.extend([5, 9]);
        let want: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(pixel_sha256(&img), want);
        // Same samples, other shape: another hash.
        assert_ne!(pixel_sha256(&GrayImage::from_raw(1, 2, vec![5, 9]).unwrap()), want);
    }

    #[test]
    fn a_deflate_bomb_is_refused_at_the_cap() {
        use std::io::Write;
        // A valid start, then 80 MiB of zeros as pixel data: about 80 KB once deflated.
        let (ds, _) = small_image_dataset();
        let body = &ds[..ds.len() - (12 + 16)];
        let huge: u32 = 80 << 20;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(body).unwrap();
        e.write_all(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]).unwrap();
        e.write_all(&huge.to_le_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..80 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = part10(DEFLATED, &e.finish().unwrap());
        assert!(bomb.len() < 200_000, "{} bytes", bomb.len());
        let err = decode_upload(&bomb).unwrap_err();
        assert!(matches!(err, UploadError::LimitExceeded { limit: LimitKind::InflatedBytes, .. }), "{err}");
        assert!(err.to_string().contains("inflates to more than 67108864 bytes"), "{err}");
        // The cap is a parameter: a small one refuses a small stream the same way.
        let small = UploadLimits { max_inflated_bytes: 64, ..UploadLimits::default() };
        let (ds, _) = small_image_dataset();
        let err = decode_upload_with(&part10(DEFLATED, &deflate(&ds)), &small).unwrap_err();
        assert!(matches!(err, UploadError::LimitExceeded { limit: LimitKind::InflatedBytes, .. }), "{err}");
    }

    #[test]
    fn the_inflate_buffer_never_grows_past_the_cap() {
        let data = vec![7u8; 300_000];
        let z = deflate(&data);
        let out = crate::dicom_read::inflate_capped(&z, 300_000).unwrap();
        assert_eq!(out, data);
        assert!(out.capacity() <= 300_000, "capacity {}", out.capacity());
        let err = crate::dicom_read::inflate_capped(&z, 299_999).unwrap_err();
        assert!(matches!(err, UploadError::LimitExceeded { limit: LimitKind::InflatedBytes, .. }), "{err}");
    }

    #[test]
    fn oversized_dicom_headers_are_refused_without_decoding() {
        let header = |rows: u16, cols: u16, samples: u16, bits: u16, frames: &str| {
            let mut d = Vec::new();
            d.extend(el(0x0028, 0x0002, b"US", &samples.to_le_bytes()));
            d.extend(el(0x0028, 0x0004, b"CS", &even(if samples == 3 { "RGB" } else { "MONOCHROME2" })));
            d.extend(el(0x0028, 0x0008, b"IS", &even(frames)));
            d.extend(el(0x0028, 0x0010, b"US", &rows.to_le_bytes()));
            d.extend(el(0x0028, 0x0011, b"US", &cols.to_le_bytes()));
            d.extend(el(0x0028, 0x0100, b"US", &bits.to_le_bytes()));
            // Ten bytes of pixel data: decoding any of these would fail differently.
            d.extend(el(0x7FE0, 0x0010, b"OB", &[0; 10]));
            decode_upload(&part10(EXPLICIT_LE, &d)).unwrap_err()
        };
        let e = header(20_000, 20_000, 1, 16, "1");
        assert_eq!(e, UploadError::TooLarge { width: 20_000, height: 20_000, max_side: MAX_SIDE });
        let e = header(8_000, 8_000, 3, 16, "1");
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::FrameBytes, .. }), "{e}");
        assert!(e.to_string().contains("384000000 bytes"), "{e}");
        let e = header(2_048, 2_048, 1, 16, "100");
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::TotalPixelBytes, .. }), "{e}");
        // Within every bound, the short pixel data is what fails: the checks above came first.
        let e = header(64, 64, 1, 16, "1");
        assert!(matches!(e, UploadError::Undecodable { .. }), "{e}");
    }

    #[test]
    fn a_declared_length_beyond_the_file_is_refused_before_the_parser_allocates_it() {
        let mut d = el(0x0010, 0x0010, b"PN", &even("Doe^Jane"));
        d.extend([0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        d.extend(0xFFFF_FFF0u32.to_le_bytes());
        d.extend([1, 2, 3, 4]);
        let e = decode_upload(&part10(EXPLICIT_LE, &d)).unwrap_err();
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::ElementLength, .. }), "{e}");
        assert!(!e.to_string().contains("Doe"), "{e}");
        // 600,000 backslashes would be 600,000 strings in the parsed object.
        let many = vec![b'\\'; 30_000];
        let mut ds = Vec::new();
        for i in 0..20u16 {
            ds.extend(el(0x0008, 0x0100 + i, b"LO", &many));
        }
        let e = decode_upload(&part10(EXPLICIT_LE, &ds)).unwrap_err();
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::Values, .. }), "{e}");
    }

    /// `small_image_dataset` re-encoded in Implicit VR Little Endian.
    fn implicit(explicit: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < explicit.len() {
            let vr = &explicit[i + 4..i + 6];
            let (len, header) = if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
                (u32::from_le_bytes(explicit[i + 8..i + 12].try_into().unwrap()) as usize, 12)
            } else {
                (u16::from_le_bytes(explicit[i + 6..i + 8].try_into().unwrap()) as usize, 8)
            };
            out.extend(&explicit[i..i + 4]);
            out.extend((len as u32).to_le_bytes());
            out.extend(&explicit[i + header..i + header + len]);
            i += header + len;
        }
        out
    }

    #[test]
    fn implicit_vr_files_are_walked_with_the_dictionary_and_decode() {
        let (ds, img) = small_image_dataset();
        let d = decode_upload(&part10("1.2.840.10008.1.2", &implicit(&ds))).unwrap();
        assert_eq!(d.image, img);
        assert!(d.removed.iter().any(|r| r == "PatientName"), "{:?}", d.removed);
        // A declared length past the end is caught in implicit VR too.
        let mut bad = implicit(&ds);
        bad.extend([0x10, 0x00, 0x30, 0x00]);
        bad.extend(0x7FFF_FFFFu32.to_le_bytes());
        let e = decode_upload(&part10("1.2.840.10008.1.2", &bad)).unwrap_err();
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::ElementLength, .. }), "{e}");
    }

    #[test]
    fn sequences_nested_too_deep_are_refused() {
        // 40 undefined-length sequences, each in an undefined-length item of the one before.
        let mut ds = Vec::new();
        for _ in 0..40 {
            ds.extend([0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
            ds.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        for _ in 0..40 {
            ds.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            ds.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        let e = decode_upload(&part10(EXPLICIT_LE, &ds)).unwrap_err();
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::Depth, .. }), "{e}");
        let deep_enough = UploadLimits { max_depth: 100, ..UploadLimits::default() };
        let e = decode_upload_with(&part10(EXPLICIT_LE, &ds), &deep_enough).unwrap_err();
        assert_eq!(e, UploadError::NoPixelData);
    }

    #[test]
    fn unknown_and_undecodable_transfer_syntaxes_are_named() {
        let (ds, _) = small_image_dataset();
        let e = decode_upload(&part10("1.2.3.4.5", &ds)).unwrap_err();
        assert_eq!(e, UploadError::UnsupportedTransferSyntax { uid: "1.2.3.4.5".into(), name: None });
        // JPEG-LS needs a C++ codec mica does not build with.
        let e = decode_upload(&part10("1.2.840.10008.1.2.4.80", &ds)).unwrap_err();
        assert!(matches!(&e, UploadError::UnsupportedTransferSyntax { name: Some(n), .. } if n.contains("JPEG-LS")), "{e}");
        assert!(e.to_string().contains("1.2.840.10008.1.2.4.80"), "{e}");
    }

    /// A PNG whose header declares `w` x `h` (CRC fixed), with a tiny body.
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut png = crate::image::png_bytes(&GrayImage::new(1, 1));
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        png
    }

    #[test]
    fn a_png_bomb_is_refused_from_its_header() {
        let e = decode_upload(&png_declaring(100_000, 100_000)).unwrap_err();
        assert_eq!(e, UploadError::TooLarge { width: 100_000, height: 100_000, max_side: MAX_SIDE });
        let small = UploadLimits { max_frame_bytes: 1 << 20, ..UploadLimits::default() };
        let e = decode_upload_with(&png_declaring(2_000, 2_000), &small).unwrap_err();
        assert!(matches!(e, UploadError::LimitExceeded { limit: LimitKind::FrameBytes, .. }), "{e}");
        assert!(e.to_string().contains("4000000 bytes"), "{e}");
    }

    #[test]
    fn codestream_dimensions_are_read_from_jpeg_and_j2k_headers() {
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0, 0];
        jpeg.extend([0xFF, 0xC0, 0x00, 0x0B, 8, 0x01, 0x00, 0x02, 0x00, 1, 0, 0, 0]);
        assert_eq!(codestream_dimensions(&jpeg), Some((512, 256)));
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [1000u32, 800, 10, 0] {
            j2k.extend(v.to_be_bytes());
        }
        assert_eq!(codestream_dimensions(&j2k), Some((990, 800)));
        assert_eq!(codestream_dimensions(b"garbage"), None);
    }

    #[test]
    fn real_dicom_fixtures_still_decode_within_the_default_limits() {
        for f in ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"] {
            let d = decode_upload(&std::fs::read(fixture(f)).unwrap()).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(d.image.width() > 0 && d.pixel_sha256.len() == 64, "{f}");
            let path = fixture(f);
            let from_file = crate::image::load_gray(&mica_core::ImageSource::file(&path)).unwrap();
            assert_eq!(d.image, from_file, "{f}");
            let src = d.memory_source("case");
            assert_eq!(crate::image::load_gray(&src).unwrap(), d.image, "{f}");
        }
    }
}
