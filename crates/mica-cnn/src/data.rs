//! Decoded, resized images held in memory as one `f32` buffer per split, plus seeded
//! augmentation.
//!
//! Decoding a PNG costs far more than a training step on a 64 px image, so every image is
//! decoded and resized exactly once per run and epochs only copy (and augment) from memory.

use mica_core::{Dataset, ImageSource, Modality, Sample, Split};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::CnnError;

/// One split's images, `n x channels x size x size`, values in `[0, 1]`, row-major CHW.
#[derive(Debug, Clone)]
pub struct ImageCache {
    pub size: usize,
    pub channels: usize,
    pub data: Vec<f32>,
    pub labels: Vec<usize>,
    pub ids: Vec<String>,
    /// How many source images were not `size x size` and were resized.
    pub resized: usize,
}

impl ImageCache {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn pixels_per_image(&self) -> usize {
        self.channels * self.size * self.size
    }

    pub fn image(&self, i: usize) -> &[f32] {
        let p = self.pixels_per_image();
        &self.data[i * p..(i + 1) * p]
    }

    /// Decodes and resizes the given samples.
    pub fn load<'a>(
        samples: impl IntoIterator<Item = &'a Sample>,
        size: usize,
        channels: usize,
    ) -> Result<Self, CnnError> {
        let mut cache = ImageCache {
            size,
            channels,
            data: Vec::new(),
            labels: Vec::new(),
            ids: Vec::new(),
            resized: 0,
        };
        for s in samples {
            let (px, was_resized) = load_image(&s.source, size, channels)?;
            cache.data.extend_from_slice(&px);
            cache.labels.push(s.label);
            cache.ids.push(s.id.clone());
            cache.resized += was_resized as usize;
        }
        Ok(cache)
    }

    /// Per-channel mean and standard deviation, the normalisation stored in checkpoints.
    pub fn stats(&self) -> Normalization {
        let hw = self.size * self.size;
        let mut mean = vec![0.0f64; self.channels];
        let mut sq = vec![0.0f64; self.channels];
        for i in 0..self.len() {
            let img = self.image(i);
            for c in 0..self.channels {
                for &v in &img[c * hw..(c + 1) * hw] {
                    mean[c] += v as f64;
                    sq[c] += (v as f64) * (v as f64);
                }
            }
        }
        let n = (self.len() * hw).max(1) as f64;
        let mut std = vec![0.0f32; self.channels];
        let mut m = vec![0.0f32; self.channels];
        for c in 0..self.channels {
            let mu = mean[c] / n;
            let var = (sq[c] / n - mu * mu).max(0.0);
            m[c] = mu as f32;
            // A constant image set would divide by zero; 1.0 leaves it merely centred.
            std[c] = if var.sqrt() < 1e-6 { 1.0 } else { var.sqrt() as f32 };
        }
        Normalization { mean: m, std }
    }

    /// A stratified, seeded hold-out of `fraction` of this cache (at least one image per class
    /// that has two or more), for datasets that come without a validation split.
    pub fn split_off(&mut self, fraction: f64, rng: &mut ChaCha8Rng) -> ImageCache {
        let classes = self.labels.iter().copied().max().map_or(0, |m| m + 1);
        let mut take = vec![false; self.len()];
        for c in 0..classes {
            let mut idx: Vec<usize> = (0..self.len()).filter(|&i| self.labels[i] == c).collect();
            if idx.len() < 2 {
                continue;
            }
            shuffle(&mut idx, rng);
            let k = ((idx.len() as f64 * fraction).round() as usize).clamp(1, idx.len() - 1);
            for &i in &idx[..k] {
                take[i] = true;
            }
        }
        let p = self.pixels_per_image();
        let mut kept = ImageCache { data: Vec::new(), labels: Vec::new(), ids: Vec::new(), resized: 0, ..*self };
        let mut held = ImageCache { data: Vec::new(), labels: Vec::new(), ids: Vec::new(), resized: 0, ..*self };
        for i in 0..self.len() {
            let dst = if take[i] { &mut held } else { &mut kept };
            dst.data.extend_from_slice(&self.data[i * p..(i + 1) * p]);
            dst.labels.push(self.labels[i]);
            dst.ids.push(self.ids[i].clone());
        }
        kept.resized = self.resized;
        *self = kept;
        held
    }
}

/// Input normalisation, `(x - mean) / std` per channel, applied after augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    pub fn apply(&self, img: &mut [f32], size: usize) {
        let hw = size * size;
        for (c, chunk) in img.chunks_mut(hw).enumerate() {
            let (m, s) = (self.mean[c], self.std[c]);
            for v in chunk {
                *v = (*v - m) / s;
            }
        }
    }
}

/// Reads one image as `channels x size x size` floats in `[0, 1]`; returns whether it had to be
/// resized.
pub fn load_image(
    source: &ImageSource,
    size: usize,
    channels: usize,
) -> Result<(Vec<f32>, bool), CnnError> {
    let err = |message: String| CnnError::Image {
        path: source.path().to_path_buf(),
        message,
    };
    // True colour only exists in raster files; everything else (DICOM, .npz, grayscale PNG)
    // goes through mica-data's decoder, the one the LLM arm and the web app use too, so a
    // DICOM is windowed the same way whichever model looks at it.
    if let ImageSource::File { path } = source {
        if channels == 3 && !mica_data::image::is_dicom_path(path) {
            let img = image::open(path).map_err(|e| err(e.to_string()))?;
            return Ok(from_dynamic(&img, size, channels));
        }
    }
    let gray = mica_data::image::load_gray(source).map_err(|e| err(e.to_string()))?;
    let resized = gray.width() as usize != size || gray.height() as usize != size;
    let px = mica_data::image::gray_to_tensor(&gray, size as u32, channels as u8);
    Ok((px, resized))
}

/// Converts a decoded image to normalised-later CHW floats at `size x size`.
pub fn from_dynamic(img: &image::DynamicImage, size: usize, channels: usize) -> (Vec<f32>, bool) {
    let s = size as u32;
    let resized = img.width() != s || img.height() != s;
    let img = if resized {
        img.resize_exact(s, s, image::imageops::FilterType::Triangle)
    } else {
        img.clone()
    };
    let hw = size * size;
    let mut out = vec![0.0f32; channels * hw];
    if channels == 1 {
        let g = img.to_luma8();
        for (o, p) in out.iter_mut().zip(g.pixels()) {
            *o = p.0[0] as f32 / 255.0;
        }
    } else {
        let rgb = img.to_rgb8();
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3.min(channels) {
                out[c * hw + i] = p.0[c] as f32 / 255.0;
            }
        }
    }
    (out, resized)
}

/// Reads a sample image's width and height without decoding all of it when possible.
pub fn image_dimensions(source: &ImageSource) -> Option<(u32, u32)> {
    mica_data::image::probe(source).ok().map(|p| (p.width, p.height))
}

/// Which augmentations are anatomically safe for a modality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Left-right flips. Off for chest images: the heart sits on the left, and a mirrored chest
    /// is not a plausible patient. Brain MRI is close enough to symmetric.
    pub hflip: bool,
    pub max_rotation_deg: f32,
    /// Random zoom-in crop: the crop keeps at least this share of the side.
    pub min_crop: f32,
    /// Brightness shift and contrast factor ranges (symmetric around 0 and 1).
    pub brightness: f32,
    pub contrast: f32,
}

impl Augment {
    pub fn for_modality(m: Modality) -> Self {
        Augment {
            hflip: matches!(m, Modality::Mri),
            max_rotation_deg: 10.0,
            min_crop: 0.85,
            brightness: 0.08,
            contrast: 0.12,
        }
    }

    pub fn none() -> Self {
        Augment { hflip: false, max_rotation_deg: 0.0, min_crop: 1.0, brightness: 0.0, contrast: 0.0 }
    }

    /// Writes an augmented copy of `src` (`channels x size x size`) into `dst`.
    ///
    /// One inverse affine map (flip, rotation, zoom and shift about the centre) with bilinear
    /// sampling and edge clamping, then intensity jitter; all draws from the caller's RNG.
    pub fn apply(&self, src: &[f32], dst: &mut [f32], size: usize, channels: usize, rng: &mut ChaCha8Rng) {
        let flip = self.hflip && rng.random::<bool>();
        let angle = if self.max_rotation_deg > 0.0 {
            rng.random_range(-self.max_rotation_deg..=self.max_rotation_deg).to_radians()
        } else {
            0.0
        };
        let scale = if self.min_crop < 1.0 { rng.random_range(self.min_crop..=1.0) } else { 1.0 };
        let max_shift = (1.0 - scale) * size as f32 / 2.0;
        let (dx, dy) = if max_shift > 0.0 {
            (rng.random_range(-max_shift..=max_shift), rng.random_range(-max_shift..=max_shift))
        } else {
            (0.0, 0.0)
        };
        let b = if self.brightness > 0.0 { rng.random_range(-self.brightness..=self.brightness) } else { 0.0 };
        let k = if self.contrast > 0.0 { rng.random_range(1.0 - self.contrast..=1.0 + self.contrast) } else { 1.0 };

        let hw = size * size;
        let c0 = (size as f32 - 1.0) / 2.0;
        let (sin, cos) = angle.sin_cos();
        for y in 0..size {
            for x in 0..size {
                // Output pixel -> source pixel.
                let mut u = x as f32 - c0;
                let v = y as f32 - c0;
                if flip {
                    u = -u;
                }
                let sx = scale * (cos * u - sin * v) + c0 + dx;
                let sy = scale * (sin * u + cos * v) + c0 + dy;
                for c in 0..channels {
                    let plane = &src[c * hw..(c + 1) * hw];
                    let val = bilinear(plane, size, sx, sy);
                    dst[c * hw + y * size + x] = ((val - 0.5) * k + 0.5 + b).clamp(0.0, 1.0);
                }
            }
        }
    }
}

fn bilinear(plane: &[f32], size: usize, x: f32, y: f32) -> f32 {
    let max = (size - 1) as f32;
    let x = x.clamp(0.0, max);
    let y = y.clamp(0.0, max);
    let x0 = x.floor() as usize;
    let y0 = y.floor() as usize;
    let x1 = (x0 + 1).min(size - 1);
    let y1 = (y0 + 1).min(size - 1);
    let fx = x - x0 as f32;
    let fy = y - y0 as f32;
    let p = |xx: usize, yy: usize| plane[yy * size + xx];
    let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
    let bot = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
    top * (1.0 - fy) + bot * fy
}

/// Fisher-Yates with the run's RNG (rand's `SliceRandom` would do the same; this keeps the
/// exact sequence independent of rand's internals across versions).
pub fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

/// The samples of one split, in dataset order.
pub fn split_samples(ds: &Dataset, split: Split) -> Vec<&Sample> {
    ds.split(split).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient(size: usize) -> Vec<f32> {
        (0..size * size).map(|i| (i % size) as f32 / (size - 1) as f32).collect()
    }

    #[test]
    fn dicom_and_npz_sources_load_like_png() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mica-data/tests/fixtures");
        for name in ["MR_small.dcm", "CT_small.dcm"] {
            let (px, resized) = load_image(&ImageSource::file(fixtures.join(name)), 32, 1).unwrap();
            assert_eq!(px.len(), 32 * 32, "{name}");
            assert!(resized, "{name} is 64 px or larger, so it was resized");
            let (lo, hi) = px.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            assert!(lo >= 0.0 && hi <= 1.0 && hi - lo > 0.2, "{name}: windowed to [0, 1] with contrast");
        }
        // A DICOM without pixel data is an error naming the file, not a panic.
        let err = load_image(&ImageSource::file(fixtures.join("CT_small_no_pixels.dcm")), 32, 1).unwrap_err();
        assert!(err.to_string().contains("CT_small_no_pixels.dcm"), "{err}");

        // A MedMNIST-style array.
        let dir = tempfile::tempdir().unwrap();
        let npz = dir.path().join("tiny.npz");
        let arr = ndarray::Array3::<u8>::from_shape_fn((2, 8, 8), |(n, y, x)| (n * 100 + y * 8 + x) as u8);
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&npz).unwrap());
        w.add_array("test_images", &arr).unwrap();
        w.finish().unwrap();
        let src = ImageSource::Npz { path: npz, array: "test_images".into(), index: 1 };
        let (px, resized) = load_image(&src, 8, 1).unwrap();
        assert!(!resized);
        assert!((px[0] - 100.0 / 255.0).abs() < 1e-6 && (px[63] - 163.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn no_augmentation_is_the_identity() {
        let src = gradient(16);
        let mut dst = vec![0.0; 256];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        Augment::none().apply(&src, &mut dst, 16, 1, &mut rng);
        for (a, b) in src.iter().zip(&dst) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn augmentation_is_seeded_and_changes_the_image() {
        let src = gradient(16);
        let aug = Augment::for_modality(Modality::Mri);
        let run = |seed| {
            let mut dst = vec![0.0; 256];
            aug.apply(&src, &mut dst, 16, 1, &mut ChaCha8Rng::seed_from_u64(seed));
            dst
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert_ne!(run(7), src);
        assert!(run(7).iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn chest_images_are_never_mirrored() {
        assert!(!Augment::for_modality(Modality::Xray).hflip);
        assert!(!Augment::for_modality(Modality::Ct).hflip);
        assert!(Augment::for_modality(Modality::Mri).hflip);
    }

    #[test]
    fn stats_and_split_off_are_stratified() {
        let mut c = ImageCache {
            size: 2,
            channels: 1,
            data: (0..40).map(|i| (i % 4) as f32 / 4.0).collect(),
            labels: (0..10).map(|i| i % 2).collect(),
            ids: (0..10).map(|i| i.to_string()).collect(),
            resized: 0,
        };
        let n = c.stats();
        assert!((n.mean[0] - 0.375).abs() < 1e-6);
        let held = c.split_off(0.2, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(held.len() + c.len(), 10);
        assert_eq!(held.labels.iter().filter(|&&l| l == 0).count(), 1);
        assert_eq!(held.labels.iter().filter(|&&l| l == 1).count(), 1);
        assert_eq!(held.data.len(), held.len() * 4);
    }
}
