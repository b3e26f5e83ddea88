//! Synthetic 4-class phantoms that stand in for the three study datasets, so training,
//! classification, metrics and reports run end to end offline.
//!
//! Each image is a stylised anatomy (chest radiograph, axial brain MRI, axial chest CT) with
//! patient-to-patient variation (size, position, rotation, brightness, contrast, gamma, noise)
//! and class evidence in the location, shape, texture and intensity of lesions. Severity varies
//! and some cases are subtle, so classes overlap: a CNN can learn them but not perfectly, and
//! global statistics such as mean intensity are close to useless.
//!
//! The phantoms are written in the folder layouts of the real Kaggle datasets, so the real
//! loaders are what reads them. Every image has its own RNG stream derived from (seed,
//! modality, class, index), so output is byte-identical for a seed whatever the thread count.

use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use image::GrayImage;
use mica_core::{Modality, Split};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Marker file in a generated dataset: only folders carrying it are ever replaced.
pub const MARKER: &str = ".mica-synth.json";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Images per class, over all of the layout's split folders.
    pub per_class: usize,
    /// Side of the square images in pixels.
    pub size: u32,
    pub seed: u64,
}

impl Default for SynthConfig {
    /// 300 images per class at 64 px: small enough that a small CNN trains in minutes on two
    /// CPU cores and `mica synth --modality all` takes seconds, large enough for a stable test
    /// accuracy (the test split has 60 images per class).
    fn default() -> Self {
        SynthConfig {
            per_class: 300,
            size: 64,
            seed: 42,
        }
    }
}

/// The folder name a modality's synthetic dataset gets under the output folder.
pub fn dataset_dir_name(modality: Modality) -> &'static str {
    match modality {
        Modality::Xray => "covid19-radiography",
        Modality::Mri => "brain-tumor-mri",
        Modality::Ct => "chest-ct",
        Modality::Other => "other",
    }
}

/// Where image `index` (0-based) of class `class` goes, relative to the dataset root, and its
/// official split (None for the COVID set, which has no official split).
fn file_for(modality: Modality, class: usize, index: usize, per_class: usize) -> (String, Option<Split>) {
    match modality {
        Modality::Xray => {
            let folder = ["COVID", "Lung_Opacity", "Viral Pneumonia", "Normal"][class];
            (
                format!("COVID-19_Radiography_Dataset/{folder}/images/{folder}-{}.png", index + 1),
                None,
            )
        }
        Modality::Mri => {
            let (folder, short) = [("glioma", "gl"), ("meningioma", "me"), ("pituitary", "pi"), ("notumor", "no")][class];
            let n_train = (per_class as f64 * 0.8).round() as usize;
            if index < n_train {
                (format!("Training/{folder}/Tr-{short}_{:04}.png", index + 1), Some(Split::Train))
            } else {
                (format!("Testing/{folder}/Te-{short}_{:04}.png", index - n_train + 1), Some(Split::Test))
            }
        }
        Modality::Ct => {
            let staged = [
                "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
                "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
                "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
                "normal",
            ][class];
            let plain = ["adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma", "normal"][class];
            let n_train = (per_class as f64 * 0.7).round() as usize;
            let n_val = (per_class as f64 * 0.1).round() as usize;
            if index < n_train {
                (format!("Data/train/{staged}/{:06}.png", index + 1), Some(Split::Train))
            } else if index < n_train + n_val {
                (format!("Data/valid/{staged}/{:06}.png", index + 1), Some(Split::Val))
            } else {
                (format!("Data/test/{plain}/{:06}.png", index + 1), Some(Split::Test))
            }
        }
        Modality::Other => unreachable!("checked by generate"),
    }
}

fn image_rng(seed: u64, modality: Modality, class: usize, index: usize, stream: u64) -> ChaCha8Rng {
    let m = match modality {
        Modality::Xray => 1u64,
        Modality::Mri => 2,
        Modality::Ct => 3,
        Modality::Other => 4,
    };
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream((m << 56) ^ ((class as u64) << 48) ^ ((index as u64) << 2) ^ stream);
    r
}

/// Generates one dataset folder `out/<dataset>` for `modality` and returns its path.
///
/// An existing folder is replaced only if an earlier `generate` made it (marker file), so a
/// typo in `--out` cannot wipe real data.
pub fn generate(out: &Path, modality: Modality, cfg: &SynthConfig) -> Result<PathBuf, DataError> {
    if modality == Modality::Other {
        return Err(DataError::usage(out, "synthetic data exists only for xray, mri and ct"));
    }
    if cfg.per_class < 5 {
        return Err(DataError::usage(out, format!("--per-class {} is too small (at least 5, so every split folder gets images)", cfg.per_class)));
    }
    if !(16..=1024).contains(&cfg.size) {
        return Err(DataError::usage(out, format!("--size {} is out of range (16 to 1024 pixels)", cfg.size)));
    }
    if out.is_file() {
        return Err(DataError::usage(out, "is a file; --out must be a folder"));
    }
    let root = out.join(dataset_dir_name(modality));
    if root.exists() {
        if !root.join(MARKER).is_file() {
            let empty = std::fs::read_dir(&root).map_err(|e| DataError::io(&root, e))?.next().is_none();
            if !empty {
                return Err(DataError::usage(
                    &root,
                    "exists and was not made by `mica synth`; refusing to overwrite it (choose another --out)",
                ));
            }
        }
        std::fs::remove_dir_all(&root).map_err(|e| DataError::io(&root, e))?;
    }
    std::fs::create_dir_all(&root).map_err(|e| DataError::io(&root, e))?;

    let jobs: Vec<(usize, usize)> = (0..4).flat_map(|c| (0..cfg.per_class).map(move |i| (c, i))).collect();
    let rows: Vec<Result<MetaRow, DataError>> = jobs
        .par_iter()
        .map(|&(class, index)| {
            let (rel, _split) = file_for(modality, class, index, cfg.per_class);
            let mut rng = image_rng(cfg.seed, modality, class, index, 0);
            let img = render(modality, class, cfg.size, &mut rng);
            let path = root.join(&rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
            }
            std::fs::write(&path, crate::image::png_bytes(&img)).map_err(|e| DataError::io(&path, e))?;
            let mut mrng = image_rng(cfg.seed, modality, class, index, 1);
            Ok(clinical_context(modality, class, &rel, &mut mrng))
        })
        .collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["path", "age", "sex", "symptoms", "context"]).expect("in-memory csv");
    for r in rows {
        let r = r?;
        w.write_record([r.path, r.age.to_string(), r.sex.to_string(), r.symptoms.clone(), r.context])
            .expect("in-memory csv");
    }
    let meta = root.join(crate::layout::METADATA_FILE);
    std::fs::write(&meta, w.into_inner().expect("in-memory csv")).map_err(|e| DataError::io(&meta, e))?;
    let marker = serde_json::json!({ "generator": "mica synth", "modality": modality, "config": cfg });
    let mp = root.join(MARKER);
    std::fs::write(&mp, serde_json::to_vec_pretty(&marker).expect("json")).map_err(|e| DataError::io(&mp, e))?;
    Ok(root)
}

/// Renders one phantom of `class` (index into the modality's canonical labels).
pub fn render(modality: Modality, class: usize, size: u32, rng: &mut ChaCha8Rng) -> GrayImage {
    let patient = Patient::draw(rng);
    let scene: Box<dyn Fn(f32, f32) -> f32 + Sync> = match modality {
        Modality::Xray => xray(class, rng),
        Modality::Mri => mri(class, rng),
        Modality::Ct => ct(class, rng),
        Modality::Other => Box::new(|_, _| 0.0),
    };
    let n = size as usize;
    let mut out = GrayImage::new(size, size);
    for y in 0..n {
        for x in 0..n {
            let u = (x as f32 + 0.5) / n as f32;
            let v = (y as f32 + 0.5) / n as f32;
            let (p, q) = patient.to_anatomy(u, v);
            let val = patient.grade(scene(p, q)) + patient.noise * gauss(rng);
            out.put_pixel(x as u32, y as u32, image::Luma([(val.clamp(0.0, 1.0) * 255.0).round() as u8]));
        }
    }
    out
}

/// Standard normal sample (Box-Muller), to avoid another dependency for one distribution.
fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// Per-patient geometry and acquisition: what varies between any two scans of any class.
struct Patient {
    scale: f32,
    aspect: f32,
    rot: f32,
    dx: f32,
    dy: f32,
    brightness: f32,
    contrast: f32,
    gamma: f32,
    noise: f32,
}

impl Patient {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        Patient {
            scale: rng.random_range(0.86..1.12),
            aspect: rng.random_range(0.92..1.08),
            rot: rng.random_range(-0.10..0.10),
            dx: rng.random_range(-0.05..0.05),
            dy: rng.random_range(-0.05..0.05),
            brightness: rng.random_range(-0.12..0.12),
            contrast: rng.random_range(0.75..1.25),
            gamma: rng.random_range(0.8..1.25),
            noise: rng.random_range(0.01..0.045),
        }
    }

    fn to_anatomy(&self, u: f32, v: f32) -> (f32, f32) {
        let (x, y) = (u - 0.5 - self.dx, v - 0.5 - self.dy);
        let (s, c) = self.rot.sin_cos();
        let (xr, yr) = (c * x + s * y, -s * x + c * y);
        (0.5 + xr / (self.scale * self.aspect), 0.5 + yr / self.scale)
    }

    fn grade(&self, v: f32) -> f32 {
        let v = ((v - 0.5) * self.contrast + 0.5 + self.brightness).clamp(0.0, 1.0);
        v.powf(self.gamma)
    }
}

/// Smooth random texture in [-1, 1]: bilinear (smoothstep) interpolation of a random grid.
#[derive(Clone)]
struct Noise {
    n: usize,
    g: Vec<f32>,
}

impl Noise {
    fn new(rng: &mut ChaCha8Rng, n: usize) -> Self {
        Noise {
            n,
            g: (0..(n + 1) * (n + 1)).map(|_| rng.random_range(-1.0..1.0)).collect(),
        }
    }

    fn at(&self, p: f32, q: f32) -> f32 {
        let n = self.n as f32;
        let x = (p.clamp(0.0, 0.9999)) * n;
        let y = (q.clamp(0.0, 0.9999)) * n;
        let (xi, yi) = (x.floor() as usize, y.floor() as usize);
        let (fx, fy) = (x - xi as f32, y - yi as f32);
        let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
        let w = self.n + 1;
        let a = self.g[yi * w + xi];
        let b = self.g[yi * w + xi + 1];
        let c = self.g[(yi + 1) * w + xi];
        let d = self.g[(yi + 1) * w + xi + 1];
        (a + (b - a) * sx) + ((c + (d - c) * sx) - (a + (b - a) * sx)) * sy
    }
}

/// 1 inside the (rotated) ellipse, 0 outside, with a soft edge of relative width `edge`.
fn ellipse(p: f32, q: f32, cx: f32, cy: f32, rx: f32, ry: f32, angle: f32, edge: f32) -> f32 {
    let (s, c) = angle.sin_cos();
    let (x, y) = (p - cx, q - cy);
    let (xr, yr) = (c * x + s * y, -s * x + c * y);
    let d = ((xr / rx).powi(2) + (yr / ry).powi(2)).sqrt();
    smooth_step(1.0 + edge, 1.0 - edge, d)
}

fn smooth_step(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn blob(p: f32, q: f32, cx: f32, cy: f32, sigma: f32) -> f32 {
    let d2 = (p - cx).powi(2) + (q - cy).powi(2);
    (-d2 / (2.0 * sigma * sigma)).exp()
}

/// Lesion strength: mostly clear, sometimes subtle, so classes overlap a little.
fn severity(rng: &mut ChaCha8Rng) -> f32 {
    if rng.random_bool(0.08) {
        rng.random_range(0.15..0.35)
    } else {
        rng.random_range(0.5..1.0)
    }
}

type Scene = Box<dyn Fn(f32, f32) -> f32 + Sync>;

/// Chest radiograph, PA view: body, two lungs with ribs, mediastinum, heart and diaphragm.
fn xray(class: usize, rng: &mut ChaCha8Rng) -> Scene {
    let lung_rx = rng.random_range(0.13..0.17);
    let lung_ry = rng.random_range(0.25..0.31);
    let lung_y = rng.random_range(0.43..0.49);
    let gap = rng.random_range(0.16..0.2);
    let lungs = [(0.5 - gap, lung_y, -0.08f32), (0.5 + gap, lung_y, 0.08f32)];
    let heart = (rng.random_range(0.54..0.6), rng.random_range(0.6..0.66), rng.random_range(0.1..0.14));
    let rib_phase = rng.random_range(0.0..0.06);
    let body_rx = rng.random_range(0.42..0.48);
    let vessels = Noise::new(rng, 12);
    let s = severity(rng);
    let texture = Noise::new(rng, 20);
    let mut lesions: Vec<(f32, f32, f32, f32, bool)> = Vec::new(); // cx, cy, size, amp, sharp
    let mut reticular: Vec<(f32, f32, f32)> = Vec::new(); // cx, cy, sigma
    match class {
        0 => {
            // COVID-19: bilateral, peripheral, lower-zone ground-glass blobs.
            for (lx, ly, _) in lungs {
                let side = if lx < 0.5 { -1.0 } else { 1.0 };
                for _ in 0..rng.random_range(1..=3) {
                    let cx = lx + side * lung_rx * rng.random_range(0.35..0.8);
                    let cy = ly + lung_ry * rng.random_range(0.0..0.65);
                    lesions.push((cx, cy, rng.random_range(0.045..0.08), 0.21 * s, false));
                }
            }
        }
        1 => {
            // Lung opacity: one or two dense, sharper consolidations in one lung, any zone.
            let (lx, ly, _) = lungs[rng.random_range(0..2)];
            for _ in 0..rng.random_range(1..=2) {
                let cx = lx + lung_rx * rng.random_range(-0.6..0.6);
                let cy = ly + lung_ry * rng.random_range(-0.6..0.6);
                lesions.push((cx, cy, rng.random_range(0.04..0.075), 0.3 * s, true));
            }
        }
        2 => {
            // Viral pneumonia: bilateral perihilar interstitial (reticular) pattern.
            for (lx, ly, _) in lungs {
                let side = if lx < 0.5 { -1.0 } else { 1.0 };
                reticular.push((
                    lx - side * lung_rx * rng.random_range(0.1..0.5),
                    ly + lung_ry * rng.random_range(-0.2..0.3),
                    rng.random_range(0.07..0.11) * (0.6 + 0.4 * s),
                ));
            }
        }
        _ => {}
    }
    let ret_amp = 0.27 * s;
    Box::new(move |p, q| {
        let body = ellipse(p, q, 0.5, 0.58, body_rx, 0.55, 0.0, 0.06);
        let mut v = 0.06 + 0.42 * body;
        let mut lung = 0.0f32;
        for (lx, ly, a) in lungs {
            lung = lung.max(ellipse(p, q, lx, ly, lung_rx, lung_ry, a, 0.12));
        }
        v -= 0.3 * lung;
        // Ribs: curved bright bands across the lung fields.
        let mut rib = 0.0f32;
        for k in 0..9 {
            let y0 = 0.2 + rib_phase + k as f32 * 0.068 + 0.35 * (p - 0.5).powi(2);
            rib = rib.max((-((q - y0) / 0.011).powi(2)).exp());
        }
        v += 0.1 * rib * body;
        // Mediastinum and spine, heart.
        v += 0.22 * ellipse(p, q, 0.5, 0.55, 0.045, 0.45, 0.0, 0.2);
        v += 0.2 * ellipse(p, q, heart.0, heart.1, heart.2 * 1.15, heart.2, 0.3, 0.15);
        // Vascular markings, strongest near the hila (all classes).
        let hilum = blob(p, q, 0.5 - gap * 0.55, lung_y + 0.03, 0.09) + blob(p, q, 0.5 + gap * 0.55, lung_y + 0.03, 0.09);
        v += 0.05 * lung * (0.4 + hilum) * vessels.at(p, q).abs();
        // Class evidence.
        let mut les = 0.0f32;
        for &(cx, cy, r, amp, sharp) in &lesions {
            let e = if sharp {
                ellipse(p, q, cx, cy, r, r * 0.8, 0.4, 0.35)
            } else {
                blob(p, q, cx, cy, r) * (0.75 + 0.25 * texture.at(p, q))
            };
            les = les.max(amp * e);
        }
        for &(cx, cy, sg) in &reticular {
            let t = (texture.at(p * 2.3 % 1.0, q * 2.3 % 1.0)).abs();
            let mesh = smooth_step(0.35, 0.05, t);
            les = les.max(ret_amp * blob(p, q, cx, cy, sg) * mesh);
        }
        v + les * lung
    })
}

/// Axial brain MRI (T1 with contrast): skull, brain with grey/white texture, ventricles.
fn mri(class: usize, rng: &mut ChaCha8Rng) -> Scene {
    let rx = rng.random_range(0.37..0.42);
    let ry = rng.random_range(0.42..0.46);
    let vent_w = rng.random_range(0.03..0.05);
    let vent_h = rng.random_range(0.08..0.12);
    let gm = Noise::new(rng, 10);
    let fine = Noise::new(rng, 24);
    let plexus = (rng.random_range(0.44..0.47), rng.random_range(0.5..0.54));
    let s = severity(rng);
    // (cx, cy, r, kind): kind 0 glioma, 1 meningioma, 2 pituitary
    let lesion: Option<(f32, f32, f32, usize)> = match class {
        0 => {
            let ang = rng.random_range(0.0..2.0 * PI);
            let d = rng.random_range(0.1..0.24);
            Some((0.5 + d * ang.cos() * rx / 0.4, 0.47 + d * ang.sin() * ry / 0.44, rng.random_range(0.06..0.12), 0))
        }
        1 => {
            let ang = rng.random_range(0.0..2.0 * PI);
            let r = rng.random_range(0.045..0.1);
            let (cx, cy) = (0.5 + (rx - r * 0.9) * ang.cos(), 0.5 + (ry - r * 0.9) * ang.sin());
            Some((cx, cy, r, 1))
        }
        2 => Some((0.5 + rng.random_range(-0.02..0.02), rng.random_range(0.6..0.68), rng.random_range(0.03..0.055), 2)),
        _ => None,
    };
    let wobble: Vec<(f32, f32)> = (0..4).map(|k| (rng.random_range(0.0..0.25) / (k + 1) as f32, rng.random_range(0.0..2.0 * PI))).collect();
    Box::new(move |p, q| {
        let outer = ellipse(p, q, 0.5, 0.5, rx + 0.035, ry + 0.035, 0.0, 0.03);
        let inner = ellipse(p, q, 0.5, 0.5, rx, ry, 0.0, 0.03);
        let mut v = 0.03 + 0.75 * (outer - inner).max(0.0);
        let brain = ellipse(p, q, 0.5, 0.5, rx - 0.01, ry - 0.01, 0.0, 0.04);
        let tissue = 0.42 + 0.06 * gm.at(p, q) + 0.02 * fine.at(p, q);
        v += brain * tissue;
        let vent = ellipse(p, q, 0.5 - vent_w * 0.9, 0.46, vent_w, vent_h, 0.35, 0.25)
            .max(ellipse(p, q, 0.5 + vent_w * 0.9, 0.46, vent_w, vent_h, -0.35, 0.25));
        v -= 0.28 * vent * brain;
        v += 0.06 * (-((p - 0.5) / 0.004).powi(2)).exp() * brain * (1.0 - vent);
        v += 0.18 * blob(p, q, plexus.0, plexus.1, 0.012);
        if let Some((cx, cy, r, kind)) = lesion {
            let (dx, dy) = (p - cx, q - cy);
            let d = (dx * dx + dy * dy).sqrt();
            let a = dy.atan2(dx);
            match kind {
                0 => {
                    let mut rr = r;
                    for (k, &(amp, ph)) in wobble.iter().enumerate() {
                        rr *= 1.0 + amp * ((k as f32 + 2.0) * a + ph).sin();
                    }
                    let edema = smooth_step(rr * 1.8, rr * 1.2, d);
                    let rim = (-((d - rr * 0.8) / (rr * 0.18)).powi(2)).exp();
                    let core = smooth_step(rr * 0.7, rr * 0.4, d);
                    v += brain * s * (-0.08 * edema + 0.32 * rim - 0.12 * core);
                }
                1 => {
                    let m = smooth_step(r * 1.1, r * 0.9, d);
                    v += s * 0.33 * m * (1.0 + 0.1 * fine.at(p, q));
                }
                _ => {
                    let m = smooth_step(1.15, 0.85, ((dx / r).powi(2) + (dy / (r * 1.3)).powi(2)).sqrt());
                    v += s * 0.32 * m;
                }
            }
        }
        v
    })
}

/// Axial chest CT, lung window: body, lungs, mediastinum, spine, vessels.
fn ct(class: usize, rng: &mut ChaCha8Rng) -> Scene {
    let body = (rng.random_range(0.42..0.47), rng.random_range(0.32..0.37));
    let lung_rx = rng.random_range(0.13..0.16);
    let lung_ry = rng.random_range(0.22..0.26);
    let gap = rng.random_range(0.17..0.2);
    let lungs = [(0.5 - gap, 0.5f32), (0.5 + gap, 0.5f32)];
    let vessels: Vec<(f32, f32, f32)> = (0..rng.random_range(8..18))
        .map(|_| {
            let (lx, ly) = lungs[rng.random_range(0..2)];
            let a = rng.random_range(0.0..2.0 * PI);
            let d = rng.random_range(0.0..0.85f32).sqrt();
            (lx + d * lung_rx * a.cos(), ly + d * lung_ry * a.sin(), rng.random_range(0.005..0.011))
        })
        .collect();
    let s = severity(rng);
    let tex = Noise::new(rng, 16);
    // (cx, cy, r, kind): 0 adeno (peripheral, ground glass halo, spiculated), 1 large cell
    // (big, solid, lobulated), 2 squamous (central, often cavitated)
    let side = rng.random_range(0..2);
    let (lx, ly) = lungs[side];
    let out = if side == 0 { -1.0 } else { 1.0 };
    let a = rng.random_range(-1.2..1.2f32);
    let lesion = match class {
        0 => Some((lx + out * lung_rx * rng.random_range(0.45..0.75) * a.cos(), ly + lung_ry * 0.7 * a.sin(), rng.random_range(0.028..0.05), 0)),
        1 => Some((lx + out * lung_rx * rng.random_range(0.1..0.55) * a.cos(), ly + lung_ry * 0.6 * a.sin(), rng.random_range(0.055..0.085), 1)),
        2 => Some((lx - out * lung_rx * rng.random_range(0.4..0.7), ly + lung_ry * rng.random_range(-0.3..0.3), rng.random_range(0.04..0.07), 2)),
        _ => None,
    };
    let cavity = rng.random_bool(0.65);
    let spikes: Vec<f32> = (0..7).map(|_| rng.random_range(0.0..2.0 * PI)).collect();
    Box::new(move |p, q| {
        let b = ellipse(p, q, 0.5, 0.52, body.0, body.1, 0.0, 0.03);
        let fat = ellipse(p, q, 0.5, 0.52, body.0 - 0.03, body.1 - 0.03, 0.0, 0.04);
        let mut v = 0.02 + b * (0.42 + 0.1 * fat);
        let mut lung = 0.0f32;
        for (lx, ly) in lungs {
            lung = lung.max(ellipse(p, q, lx, ly, lung_rx, lung_ry, 0.0, 0.08));
        }
        let med = ellipse(p, q, 0.52, 0.52, 0.085, 0.15, 0.0, 0.1);
        lung *= 1.0 - med;
        v -= 0.44 * lung;
        v += 0.04 * lung * tex.at(p, q);
        v += 0.1 * med;
        v += 0.45 * ellipse(p, q, 0.5, 0.79, 0.05, 0.045, 0.0, 0.1);
        v += 0.2 * ellipse(p, q, 0.55, 0.66, 0.03, 0.03, 0.0, 0.15);
        let mut ves = 0.0f32;
        for &(cx, cy, r) in &vessels {
            ves = ves.max(blob(p, q, cx, cy, r));
        }
        v += 0.4 * ves * lung;
        if let Some((cx, cy, r, kind)) = lesion {
            let (dx, dy) = (p - cx, q - cy);
            let d = (dx * dx + dy * dy).sqrt();
            let ang = dy.atan2(dx);
            let m = match kind {
                0 => {
                    let mut spike = 0.0f32;
                    for &sa in &spikes {
                        let da = ((ang - sa + PI).rem_euclid(2.0 * PI) - PI).abs();
                        spike = spike.max((-(da / 0.12).powi(2)).exp());
                    }
                    let solid = smooth_step(r * (1.0 + 0.9 * spike), r * 0.8, d);
                    let halo = blob(p, q, cx, cy, r * 1.6) * 0.35;
                    solid.max(halo)
                }
                1 => {
                    let rr = r * (1.0 + 0.12 * (3.0 * ang).sin());
                    smooth_step(rr * 1.05, rr * 0.95, d)
                }
                _ => {
                    let solid = smooth_step(r * 1.08, r * 0.92, d);
                    if cavity {
                        solid * (1.0 - 0.8 * smooth_step(r * 0.5, r * 0.3, d))
                    } else {
                        solid
                    }
                }
            };
            v += s * 0.42 * m * (lung + med * 0.5).min(1.0);
        }
        v
    })
}

struct MetaRow {
    path: String,
    age: u32,
    sex: char,
    symptoms: String,
    context: String,
}

/// Clinical context drawn without reference to the class: the same phrases and the same age
/// range for every class. Synthetic context that leaned towards the class would hand an LLM
/// the answer that the CNN, which sees only pixels, never gets.
fn clinical_context(_modality: Modality, _class: usize, path: &str, rng: &mut ChaCha8Rng) -> MetaRow {
    let common = [
        "shortness of breath",
        "fatigue",
        "follow-up examination",
        "cough",
        "headache",
        "no relevant history",
        "chest discomfort",
        "referred by general practitioner",
    ];
    let symptoms = common[rng.random_range(0..common.len())].to_string();
    let age = rng.random_range(18..=85);
    let sex = if rng.random_bool(0.5) { 'F' } else { 'M' };
    let word = if sex == 'F' { "female" } else { "male" };
    MetaRow {
        path: path.to_string(),
        age,
        sex,
        context: format!("{age}-year-old {word}; {symptoms}"),
        symptoms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_class: usize) -> SynthConfig {
        SynthConfig { per_class, size: 48, seed: 3 }
    }

    #[test]
    fn layouts_are_recognised_with_generated_counts() {
        let d = tempfile::tempdir().unwrap();
        for (m, layout) in [
            (Modality::Xray, mica_core::Layout::CovidRadiography),
            (Modality::Mri, mica_core::Layout::BrainTumorMri),
            (Modality::Ct, mica_core::Layout::ChestCt),
        ] {
            let root = generate(d.path(), m, &cfg(10)).unwrap();
            let ds = crate::load_with(&root, &crate::ContextSpec::default()).unwrap();
            assert_eq!(ds.layout, layout);
            assert_eq!(ds.modality, m);
            assert!(ds.skipped.is_empty(), "{:?}", ds.skipped);
            for l in 0..4 {
                assert_eq!(ds.count(None, l), 10, "{m} class {l}");
            }
            assert!(ds.samples.iter().all(|s| s.context.as_deref().is_some_and(|c| c.contains("year-old"))));
        }
    }

    #[test]
    fn same_seed_gives_identical_bytes_and_other_seed_differs() {
        let d = tempfile::tempdir().unwrap();
        let a = generate(&d.path().join("a"), Modality::Ct, &cfg(6)).unwrap();
        let b = generate(&d.path().join("b"), Modality::Ct, &cfg(6)).unwrap();
        let c = generate(&d.path().join("c"), Modality::Ct, &SynthConfig { seed: 4, ..cfg(6) }).unwrap();
        let f = "Data/test/normal/000006.png";
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        assert_eq!(std::fs::read(a.join("metadata.csv")).unwrap(), std::fs::read(b.join("metadata.csv")).unwrap());
        assert_ne!(std::fs::read(a.join(f)).unwrap(), std::fs::read(c.join(f)).unwrap());
        // Regenerating replaces our own folder ...
        generate(&d.path().join("a"), Modality::Ct, &cfg(6)).unwrap();
        // ... but never a folder someone else made.
        let foreign = d.path().join("x").join(dataset_dir_name(Modality::Ct));
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("keep.txt"), "x").unwrap();
        let e = generate(&d.path().join("x"), Modality::Ct, &cfg(6)).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("refusing to overwrite"), "{e}");
    }

    /// The class signal must not be in the mean intensity: a nearest-class-mean classifier on
    /// mean brightness stays far below what a CNN must reach.
    #[test]
    fn mean_intensity_does_not_separate_classes() {
        for m in Modality::STUDY {
            let n = 60;
            let mut means = vec![vec![0f64; n]; 4];
            for (c, row) in means.iter_mut().enumerate() {
                for (i, slot) in row.iter_mut().enumerate() {
                    let img = render(m, c, 48, &mut image_rng(11, m, c, i, 0));
                    *slot = img.as_raw().iter().map(|&v| v as f64).sum::<f64>() / img.as_raw().len() as f64;
                }
            }
            // Fit class means on the first half, test on the second.
            let centre: Vec<f64> = means.iter().map(|r| r[..n / 2].iter().sum::<f64>() / (n / 2) as f64).collect();
            let mut correct = 0;
            for (c, row) in means.iter().enumerate() {
                for &v in &row[n / 2..] {
                    let best = (0..4).min_by(|&a, &b| (v - centre[a]).abs().partial_cmp(&(v - centre[b]).abs()).unwrap()).unwrap();
                    correct += (best == c) as usize;
                }
            }
            let acc = correct as f64 / (4 * n / 2) as f64;
            eprintln!("{m}: nearest-mean-intensity accuracy {acc:.3} (chance 0.25)");
            assert!(acc < 0.6, "{m}: mean-intensity accuracy {acc}");
            // And the classes do differ somewhere: lesion images are not identical to normals.
            assert!(centre.iter().any(|&c| (c - centre[3]).abs() > 0.01), "{m}: {centre:?}");
        }
    }
}
