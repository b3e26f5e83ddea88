//! Pixels of a sample as models want them.
//!
//! All decoding goes through [`load_gray`], so DICOM windowing, `.npz` arrays, 16-bit PNGs and
//! colour images are turned into the same 8-bit grayscale picture for the CNN, the LLM encoder,
//! the duplicate check and the web page alike.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fast_image_resize as fr;
use image::{GrayImage, ImageEncoder};
use mica_core::ImageSource;
use ndarray::{ArrayD, Axis, IxDyn};

use crate::DataError;

/// File extensions read as ordinary raster images.
pub const RASTER_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];
/// File extensions read as DICOM (files without an extension are checked for the `DICM` magic).
pub const DICOM_EXTENSIONS: [&str; 2] = ["dcm", "dicom"];

/// What a cheap look at a file (header only) tells about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub width: u32,
    pub height: u32,
    /// Frames in a multi-frame DICOM (1 for everything else); only the first is used.
    pub frames: u32,
}

/// True when the file starts like a DICOM Part 10 file (128-byte preamble, then `DICM`).
pub fn has_dicom_magic(path: &Path) -> bool {
    let mut buf = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|_| &buf[128..132] == b"DICM")
        .unwrap_or(false)
}

/// True for a path that should be read with the DICOM decoder.
pub fn is_dicom_path(path: &Path) -> bool {
    match extension(path) {
        Some(e) => DICOM_EXTENSIONS.contains(&e.as_str()),
        None => has_dicom_magic(path),
    }
}

pub(crate) fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Reads only what is needed to know a file is a usable image and its size, so loading a
/// dataset of thousands of files stays fast while obviously broken files are still listed.
pub fn probe(source: &ImageSource) -> Result<Probe, DataError> {
    match source {
        ImageSource::File { path } if is_dicom_path(path) => probe_dicom(path),
        ImageSource::File { path } => {
            let reader = open_raster(path)?;
            let (width, height) = reader
                .into_dimensions()
                .map_err(|e| DataError::invalid(path, format!("unreadable image header: {e}")))?;
            Ok(Probe {
                width,
                height,
                frames: 1,
            })
        }
        ImageSource::Npz { path, array, index } => {
            let a = npz_array(path, array)?;
            let g = npz_image(&a, path, array, *index)?;
            Ok(Probe {
                width: g.width(),
                height: g.height(),
                frames: 1,
            })
        }
        ImageSource::Memory { .. } => {
            let g = memory_gray(source)?;
            Ok(Probe {
                width: g.width(),
                height: g.height(),
                frames: 1,
            })
        }
    }
}

/// The pixels of an [`ImageSource::Memory`]; the buffer must hold exactly `width * height`
/// bytes (a source deserialised from JSON has none: its pixels were never written out).
fn memory_gray(source: &ImageSource) -> Result<GrayImage, DataError> {
    let ImageSource::Memory {
        name,
        width,
        height,
        pixels,
    } = source
    else {
        unreachable!("memory_gray is only called for memory sources");
    };
    let want = u64::from(*width) * u64::from(*height);
    if pixels.0.len() as u64 != want || want == 0 {
        return Err(DataError::invalid(
            name.as_str(),
            format!(
                "in-memory image holds {} bytes, expected {width}x{height} = {want} (8-bit gray; pixels are never serialised)",
                pixels.0.len()
            ),
        ));
    }
    Ok(GrayImage::from_raw(*width, *height, pixels.0.to_vec()).expect("length checked above"))
}

/// Decodes a sample to 8-bit grayscale. RGB is converted to luma (Rec. 709 weights); DICOM gets its modality LUT
/// (rescale) and first VOI LUT (window) applied, and of a multi-frame DICOM the first frame.
pub fn load_gray(source: &ImageSource) -> Result<GrayImage, DataError> {
    load_gray_with_frames(source).map(|(g, _)| g)
}

/// Like [`load_gray`], also returning how many frames the file had (only the first is used).
pub fn load_gray_with_frames(source: &ImageSource) -> Result<(GrayImage, u32), DataError> {
    match source {
        ImageSource::File { path } if is_dicom_path(path) => load_dicom(path),
        ImageSource::File { path } => {
            let reader = open_raster(path)?;
            let img = reader
                .decode()
                .map_err(|e| DataError::invalid(path, format!("cannot decode image: {e}")))?;
            Ok((img.to_luma8(), 1))
        }
        ImageSource::Npz { path, array, index } => {
            let a = npz_array(path, array)?;
            Ok((npz_image(&a, path, array, *index)?, 1))
        }
        ImageSource::Memory { .. } => Ok((memory_gray(source)?, 1)),
    }
}

/// Opens a raster image by its content, not its name: a text file called `x.png` is reported
/// as "not an image" rather than as a broken PNG.
fn open_raster(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>, DataError> {
    let mut head = [0u8; 64];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| DataError::io(path, e))?;
    let format = image::guess_format(&head[..n]).map_err(|_| {
        DataError::invalid(path, "not an image (content is not PNG, JPEG, BMP or TIFF)")
    })?;
    if !matches!(
        format,
        image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::Bmp | image::ImageFormat::Tiff
    ) {
        return Err(DataError::invalid(
            path,
            format!("unsupported image format {format:?} (PNG, JPEG, BMP, TIFF and DICOM are read)"),
        ));
    }
    let mut reader = image::ImageReader::open(path).map_err(|e| DataError::io(path, e))?;
    reader.set_format(format);
    Ok(reader)
}

fn open_dicom(path: &Path) -> Result<dicom_object::DefaultDicomObject, DataError> {
    dicom_object::open_file(path)
        .map_err(|e| DataError::invalid(path, format!("not a readable DICOM file: {e}")))
}

pub(crate) fn dicom_int(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> Option<u32> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<u32>().ok())
}

fn require_pixel_data(obj: &dicom_object::DefaultDicomObject, path: &Path) -> Result<(), DataError> {
    use dicom_dictionary_std::tags;
    match obj.element_opt(tags::PIXEL_DATA) {
        Ok(Some(_)) => Ok(()),
        _ => Err(DataError::invalid(
            path,
            "DICOM file has no pixel data (no PixelData element; e.g. a structured report or a stripped header)",
        )),
    }
}

/// Acquisition properties that are not pixels: bits per sample, and for DICOM the modality
/// and manufacturer. They can differ by source, and so by class (see `crate::shortcut`).
pub fn acquisition(source: &ImageSource) -> (String, String) {
    use dicom_dictionary_std::tags;
    match source {
        ImageSource::File { path } if is_dicom_path(path) => match open_dicom(path) {
            Ok(obj) => {
                let text = |t| {
                    obj.element_opt(t)
                        .ok()
                        .flatten()
                        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
                        .unwrap_or_default()
                };
                let bits = dicom_int(&obj, tags::BITS_STORED).map(|b| b.to_string()).unwrap_or_default();
                (bits, format!("{} {}", text(tags::MODALITY), text(tags::MANUFACTURER)).trim().to_string())
            }
            Err(_) => (String::new(), String::new()),
        },
        ImageSource::File { path } => {
            use image::ImageDecoder;
            let bits = open_raster(path)
                .ok()
                .and_then(|r| r.into_decoder().ok())
                .map(|d| d.color_type())
                .map(|c| (c.bits_per_pixel() / u16::from(c.channel_count())).to_string())
                .unwrap_or_default();
            (bits, String::new())
        }
        _ => ("8".into(), String::new()),
    }
}

fn probe_dicom(path: &Path) -> Result<Probe, DataError> {
    use dicom_dictionary_std::tags;
    let obj = open_dicom(path)?;
    require_pixel_data(&obj, path)?;
    let width = dicom_int(&obj, tags::COLUMNS).unwrap_or(0);
    let height = dicom_int(&obj, tags::ROWS).unwrap_or(0);
    if width == 0 || height == 0 {
        return Err(DataError::invalid(path, "DICOM file lacks Rows/Columns"));
    }
    Ok(Probe {
        width,
        height,
        frames: dicom_int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1),
    })
}

fn load_dicom(path: &Path) -> Result<(GrayImage, u32), DataError> {
    let obj = open_dicom(path)?;
    dicom_to_gray(&obj, path)
}

/// Pixels of an already parsed DICOM object (first frame, modality and VOI LUT applied);
/// `path` only names the source in errors. Shared with uploads decoded from memory.
pub(crate) fn dicom_to_gray(
    obj: &dicom_object::DefaultDicomObject,
    path: &Path,
) -> Result<(GrayImage, u32), DataError> {
    use dicom_dictionary_std::tags;
    use dicom_pixeldata::{ConvertOptions, PixelDecoder};
    require_pixel_data(obj, path)?;
    let frames = dicom_int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let decoded = obj
        .decode_pixel_data_frame(0)
        .map_err(|e| DataError::invalid(path, format!("cannot decode DICOM pixel data: {e}")))?;
    // Default options: modality LUT (rescale slope/intercept), then the first VOI LUT or
    // window stored in the file (min-max when there is none), MONOCHROME1 inverted.
    let img = decoded
        .to_dynamic_image_with_options(0, &ConvertOptions::new().force_8bit())
        .map_err(|e| DataError::invalid(path, format!("cannot convert DICOM pixel data: {e}")))?;
    Ok((img.to_luma8(), frames))
}

type NpzKey = (PathBuf, String);

/// Decoded `.npz` arrays, shared process-wide: a MedMNIST file is one compressed archive, and
/// decompressing it again for each of its thousands of images would dominate training time.
fn npz_cache() -> &'static Mutex<HashMap<NpzKey, Arc<ArrayD<u8>>>> {
    static CACHE: OnceLock<Mutex<HashMap<NpzKey, Arc<ArrayD<u8>>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Reads (once) an image array of a `.npz` file: `u8`, shape `[N,H,W]` or `[N,H,W,C]` with
/// C = 1 or 3.
pub(crate) fn npz_array(path: &Path, name: &str) -> Result<Arc<ArrayD<u8>>, DataError> {
    let key = (path.to_path_buf(), name.to_string());
    if let Some(a) = npz_cache().lock().expect("cache lock").get(&key) {
        return Ok(a.clone());
    }
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut npz = ndarray_npy::NpzReader::new(file)
        .map_err(|e| DataError::invalid(path, format!("not a readable .npz archive: {e}")))?;
    let a: ArrayD<u8> = npz.by_name(name).map_err(|e| {
        DataError::invalid(path, format!("array `{name}` is not readable as uint8 images: {e}"))
    })?;
    let shape = a.shape();
    let ok = match shape.len() {
        3 => true,
        4 => shape[3] == 1 || shape[3] == 3,
        _ => false,
    };
    if !ok {
        return Err(DataError::invalid(
            path,
            format!("array `{name}` has shape {shape:?}; expected [N,H,W] or [N,H,W,3]"),
        ));
    }
    let a = Arc::new(a);
    npz_cache()
        .lock()
        .expect("cache lock")
        .insert(key, a.clone());
    Ok(a)
}

fn npz_image(a: &ArrayD<u8>, path: &Path, name: &str, index: usize) -> Result<GrayImage, DataError> {
    let shape = a.shape();
    if index >= shape[0] {
        return Err(DataError::invalid(
            path,
            format!("`{name}` has {} images; index {index} is out of range", shape[0]),
        ));
    }
    let (h, w) = (shape[1], shape[2]);
    let img = a.index_axis(Axis(0), index);
    let mut out = GrayImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let v = if shape.len() == 3 {
                img[IxDyn(&[y, x])]
            } else if shape[3] == 1 {
                img[IxDyn(&[y, x, 0])]
            } else {
                let r = img[IxDyn(&[y, x, 0])] as f32;
                let g = img[IxDyn(&[y, x, 1])] as f32;
                let b = img[IxDyn(&[y, x, 2])] as f32;
                (0.2126 * r + 0.7152 * g + 0.0722 * b).round().clamp(0.0, 255.0) as u8
            };
            out.put_pixel(x as u32, y as u32, image::Luma([v]));
        }
    }
    Ok(out)
}

/// Resizes with fast_image_resize (Catmull-Rom convolution; about 7x faster than `image`'s
/// own filter on large radiographs).
pub fn resize_gray(img: &GrayImage, width: u32, height: u32) -> GrayImage {
    if img.width() == width && img.height() == height {
        return img.clone();
    }
    let mut dst = GrayImage::new(width.max(1), height.max(1));
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    fr::Resizer::new()
        .resize(img, &mut dst, &opts)
        .expect("gray to gray resize of non-empty images");
    dst
}

/// Model input: the image squashed to `size` x `size` (the study images are near-square, and
/// stretching keeps every pixel of the anatomy, where cropping could cut a lesion off), values
/// in [0, 1], channel-major (CHW). `channels` = 3 repeats the gray plane for models built for
/// RGB input.
pub fn load_tensor(source: &ImageSource, size: u32, channels: u8) -> Result<Vec<f32>, DataError> {
    if channels != 1 && channels != 3 {
        return Err(DataError::usage(
            source.path(),
            format!("{channels} channels requested; only 1 (gray) or 3 (gray repeated) are supported"),
        ));
    }
    if size == 0 {
        return Err(DataError::usage(source.path(), "image size must be at least 1 pixel"));
    }
    let g = load_gray(source)?;
    Ok(gray_to_tensor(&g, size, channels))
}

/// The tensor part of [`load_tensor`] for an image already in memory (e.g. an upload).
pub fn gray_to_tensor(img: &GrayImage, size: u32, channels: u8) -> Vec<f32> {
    let r = resize_gray(img, size, size);
    let plane: Vec<f32> = r.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let mut out = Vec::with_capacity(plane.len() * channels as usize);
    for _ in 0..channels {
        out.extend_from_slice(&plane);
    }
    out
}

/// Per-channel standardisation `(x - mean) / std` of a CHW tensor, e.g. with ImageNet
/// statistics for pretrained backbones, or a dataset's own mean and std.
pub fn normalize(tensor: &mut [f32], channels: usize, mean: &[f32], std: &[f32]) {
    assert!(channels > 0 && mean.len() >= channels && std.len() >= channels);
    let plane = tensor.len() / channels;
    for (c, chunk) in tensor.chunks_mut(plane).enumerate().take(channels) {
        let s = if std[c].abs() < f32::EPSILON { 1.0 } else { std[c] };
        for v in chunk {
            *v = (*v - mean[c]) / s;
        }
    }
}

/// PNG bytes of the sample, downscaled (never upscaled) so the longer side is at most
/// `max_side`; what LLM clients send, so a 3000-pixel radiograph does not cost a fortune in
/// tokens and DICOM is sent already windowed.
pub fn encode_png(source: &ImageSource, max_side: u32) -> Result<Vec<u8>, DataError> {
    let g = load_gray(source)?;
    Ok(gray_to_png(&g, max_side))
}

/// The encoding part of [`encode_png`] for an image in memory.
pub fn gray_to_png(img: &GrayImage, max_side: u32) -> Vec<u8> {
    let (w, h) = (img.width(), img.height());
    let longer = w.max(h);
    let img = if max_side > 0 && longer > max_side {
        let scale = max_side as f64 / longer as f64;
        let nw = ((w as f64 * scale).round() as u32).max(1);
        let nh = ((h as f64 * scale).round() as u32).max(1);
        resize_gray(img, nw, nh)
    } else {
        img.clone()
    };
    png_bytes(&img)
}

/// Deterministic PNG encoding (fixed compression and filter), so the same pixels always give
/// the same bytes: synthetic datasets are byte-identical per seed and LLM caches hit.
pub fn png_bytes(img: &GrayImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::L8)
    .expect("encoding a gray image to memory");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]))
    }

    #[test]
    fn tensor_is_chw_in_unit_range_and_repeats_gray() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        gradient(40, 30).save(&p).unwrap();
        let t = load_tensor(&ImageSource::file(&p), 16, 3).unwrap();
        assert_eq!(t.len(), 3 * 16 * 16);
        assert!(t.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(t[..256], t[256..512]);
        assert!(load_tensor(&ImageSource::file(&p), 16, 2).is_err());
    }

    #[test]
    fn rgb_is_converted_to_luma() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        image::RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 0])).save(&p).unwrap();
        let g = load_gray(&ImageSource::file(&p)).unwrap();
        let v = g.get_pixel(0, 0)[0];
        // Rec. 709 luma, as the image crate converts.
        assert!((50..=58).contains(&v), "red luma {v}");
    }

    #[test]
    fn png_is_downscaled_only_when_larger_and_deterministic() {
        let big = gradient(300, 150);
        let png = gray_to_png(&big, 100);
        let back = image::load_from_memory(&png).unwrap();
        assert_eq!((back.width(), back.height()), (100, 50));
        let small = gray_to_png(&gradient(20, 10), 100);
        let back = image::load_from_memory(&small).unwrap();
        assert_eq!((back.width(), back.height()), (20, 10));
        assert_eq!(gray_to_png(&big, 100), png);
    }

    #[test]
    fn non_image_and_truncated_files_give_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("notes.png");
        std::fs::write(&txt, "hello, I am text").unwrap();
        let e = load_gray(&ImageSource::file(&txt)).unwrap_err().to_string();
        assert!(e.contains("notes.png") && e.contains("not an image"), "{e}");

        let full = png_bytes(&gradient(64, 64));
        let cut = dir.path().join("cut.png");
        std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
        let e = load_gray(&ImageSource::file(&cut)).unwrap_err().to_string();
        assert!(e.contains("cut.png") && e.contains("cannot decode"), "{e}");
    }

    #[test]
    fn memory_source_loads_without_a_file_and_checks_its_size() {
        let g = gradient(5, 3);
        let src = ImageSource::memory("case-1", 5, 3, std::sync::Arc::from(g.as_raw().as_slice()));
        assert_eq!(load_gray(&src).unwrap(), g);
        assert_eq!(probe(&src).unwrap(), Probe { width: 5, height: 3, frames: 1 });
        assert_eq!(load_tensor(&src, 4, 1).unwrap().len(), 16);
        assert!(format!("{src:?}").contains("15 bytes"), "{src:?}");
        // Serialised, the pixels stay behind; loading the copy says why it has none.
        let json = serde_json::to_string(&src).unwrap();
        assert!(json.contains("\"kind\":\"memory\"") && !json.contains("pixels"), "{json}");
        let back: ImageSource = serde_json::from_str(&json).unwrap();
        let e = load_gray(&back).unwrap_err().to_string();
        assert!(e.contains("case-1") && e.contains("0 bytes"), "{e}");
    }

    #[test]
    fn normalize_standardises_each_channel() {
        let mut t = vec![0.5, 0.5, 1.0, 1.0];
        normalize(&mut t, 2, &[0.5, 0.0], &[1.0, 0.5]);
        assert_eq!(t, [0.0, 0.0, 2.0, 2.0]);
    }
}
