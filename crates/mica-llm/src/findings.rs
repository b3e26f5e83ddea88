//! Image-derived findings turned into language: the study's "image features as text" path.
//!
//! The numbers are simple, reproducible measurements (intensity and texture statistics,
//! left/right asymmetry, the largest bright and dark regions); the text states plainly that a
//! program computed them, so a language model (or a reader) never mistakes them for a
//! radiologist's report.

use image::GrayImage;
use serde::{Deserialize, Serialize};

/// Side of the working copy: enough for region statistics, cheap on 2 cores.
const WORK_SIDE: u32 = 128;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// Share of the image area, 0..1.
    pub area: f64,
    /// Centroid in image coordinates, 0..1 (x left to right, y top to bottom).
    pub cx: f64,
    pub cy: f64,
    /// Bounding box width and height as shares of the image, 0..1.
    pub width: f64,
    pub height: f64,
}

impl Region {
    /// "upper left", "central", ...
    pub fn position(&self) -> String {
        let v = if self.cy < 1.0 / 3.0 {
            "upper"
        } else if self.cy < 2.0 / 3.0 {
            "middle"
        } else {
            "lower"
        };
        let h = if self.cx < 1.0 / 3.0 {
            "left"
        } else if self.cx < 2.0 / 3.0 {
            "central"
        } else {
            "right"
        };
        match (v, h) {
            ("middle", "central") => "central".into(),
            _ => format!("{v} {h}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    pub width: u32,
    pub height: u32,
    /// Intensities on a 0..1 scale.
    pub mean: f64,
    pub std: f64,
    pub p05: f64,
    pub p50: f64,
    pub p95: f64,
    /// Shannon entropy of the 32-bin histogram, in bits (0..5).
    pub entropy: f64,
    /// Mean gradient magnitude (0..1 scale): edge density / texture.
    pub gradient: f64,
    /// Mean absolute difference between the image and its mirror image, 0..1.
    pub asymmetry: f64,
    /// Mean intensity of the left half minus the right half (image left, not patient left).
    pub left_minus_right: f64,
    pub bright: Option<Region>,
    pub dark: Option<Region>,
}

impl Findings {
    pub fn measure(img: &GrayImage) -> Findings {
        let (w0, h0) = img.dimensions();
        let small = if w0.max(h0) > WORK_SIDE {
            let s = WORK_SIDE as f64 / w0.max(h0) as f64;
            let (w, h) = (
                ((w0 as f64 * s).round() as u32).max(1),
                ((h0 as f64 * s).round() as u32).max(1),
            );
            image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle)
        } else {
            img.clone()
        };
        let (w, h) = small.dimensions();
        let px: Vec<f64> = small.pixels().map(|p| p.0[0] as f64 / 255.0).collect();
        let n = px.len().max(1) as f64;
        let mean = px.iter().sum::<f64>() / n;
        let std = (px.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let mut sorted = px.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| sorted[((sorted.len() - 1) as f64 * f).round() as usize];
        let mut hist = [0usize; 32];
        for v in &px {
            hist[((v * 32.0) as usize).min(31)] += 1;
        }
        let entropy = -hist
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                p * p.log2()
            })
            .sum::<f64>();
        let at = |x: u32, y: u32| px[(y * w + x) as usize];
        let mut grad = 0.0;
        let mut gn = 0usize;
        for y in 0..h.saturating_sub(1) {
            for x in 0..w.saturating_sub(1) {
                let gx = at(x + 1, y) - at(x, y);
                let gy = at(x, y + 1) - at(x, y);
                grad += (gx * gx + gy * gy).sqrt();
                gn += 1;
            }
        }
        let gradient = if gn > 0 { grad / gn as f64 } else { 0.0 };
        let (mut asym, mut left, mut right) = (0.0, 0.0, 0.0);
        for y in 0..h {
            for x in 0..w {
                asym += (at(x, y) - at(w - 1 - x, y)).abs();
                if x < w / 2 {
                    left += at(x, y);
                } else if x >= w - w / 2 {
                    right += at(x, y);
                }
            }
        }
        let half = ((w / 2) * h).max(1) as f64;
        let (p05, p95) = (q(0.05), q(0.95));
        // Regions: the top/bottom 10 % of intensities, but only when the image has contrast.
        let (bright, dark) = if p95 - p05 > 0.05 {
            (
                largest_region(&px, w, h, |v| v >= q(0.90).max(p05 + 0.01)),
                largest_region(&px, w, h, |v| v <= q(0.10).min(p95 - 0.01)),
            )
        } else {
            (None, None)
        };
        Findings {
            width: w0,
            height: h0,
            mean,
            std,
            p05,
            p50: q(0.5),
            p95,
            entropy,
            gradient,
            asymmetry: asym / n,
            left_minus_right: (left - right) / half,
            bright,
            dark,
        }
    }

    /// A short paragraph for the prompt.
    pub fn to_text(&self) -> String {
        let level = |v: f64| {
            if v < 0.25 {
                "dark"
            } else if v < 0.45 {
                "moderately dark"
            } else if v < 0.6 {
                "mid-grey"
            } else if v < 0.8 {
                "bright"
            } else {
                "very bright"
            }
        };
        // Only what the image shows: its native size, bit depth and format are acquisition
        // properties, which in public data sets often differ by source and so by class.
        let mut s = format!(
            "Image overall {} (mean intensity {:.2} on 0-1, spread {:.2}; 5th/50th/95th percentiles {:.2}/{:.2}/{:.2}). ",
            level(self.mean), self.mean, self.std, self.p05, self.p50, self.p95
        );
        let texture = if self.gradient < 0.02 {
            "smooth"
        } else if self.gradient < 0.06 {
            "moderately textured"
        } else {
            "coarse, highly textured"
        };
        s.push_str(&format!(
            "Texture {texture} (edge density {:.3}, histogram entropy {:.2} bits). ",
            self.gradient, self.entropy
        ));
        let sym = if self.asymmetry < 0.05 {
            "nearly symmetric"
        } else if self.asymmetry < 0.12 {
            "mildly asymmetric"
        } else {
            "markedly asymmetric"
        };
        let side = if self.left_minus_right > 0.02 {
            ", image-left side brighter"
        } else if self.left_minus_right < -0.02 {
            ", image-right side brighter"
        } else {
            ""
        };
        s.push_str(&format!(
            "Left/right {sym} (mean mirror difference {:.3}{side}). ",
            self.asymmetry
        ));
        for (name, r) in [("bright", &self.bright), ("dark", &self.dark)] {
            if let Some(r) = r {
                s.push_str(&format!(
                    "Largest {name} region: {}, {:.1}% of the area, about {:.0}% x {:.0}% of the image. ",
                    r.position(),
                    r.area * 100.0,
                    r.width * 100.0,
                    r.height * 100.0
                ));
            }
        }
        s.trim_end().to_string()
    }
}

/// The largest 4-connected component of pixels passing `inside`.
fn largest_region(px: &[f64], w: u32, h: u32, inside: impl Fn(f64) -> bool) -> Option<Region> {
    let (w, h) = (w as usize, h as usize);
    let mut seen = vec![false; px.len()];
    let mut best: Option<(usize, f64, f64, usize, usize, usize, usize)> = None;
    let mut stack = Vec::new();
    for start in 0..px.len() {
        if seen[start] || !inside(px[start]) {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut count, mut sx, mut sy) = (0usize, 0.0, 0.0);
        let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            count += 1;
            sx += x as f64;
            sy += y as f64;
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            let mut push = |j: usize| {
                if !seen[j] && inside(px[j]) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
        if best.is_none_or(|b| count > b.0) {
            best = Some((count, sx, sy, x0, x1, y0, y1));
        }
    }
    let (count, sx, sy, x0, x1, y0, y1) = best?;
    Some(Region {
        area: count as f64 / px.len() as f64,
        cx: (sx / count as f64 + 0.5) / w as f64,
        cy: (sy / count as f64 + 0.5) / h as f64,
        width: (x1 - x0 + 1) as f64 / w as f64,
        height: (y1 - y0 + 1) as f64 / h as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dark image with one bright disc in the upper right.
    fn disc() -> GrayImage {
        GrayImage::from_fn(200, 200, |x, y| {
            let (dx, dy) = (x as f64 - 150.0, y as f64 - 50.0);
            image::Luma([if dx * dx + dy * dy < 900.0 { 230 } else { 30 }])
        })
    }

    #[test]
    fn finds_the_bright_region_and_the_asymmetry() {
        let f = Findings::measure(&disc());
        let b = f.bright.clone().unwrap();
        assert_eq!(b.position(), "upper right");
        assert!(
            (b.area - std::f64::consts::PI * 900.0 / 40000.0).abs() < 0.01,
            "{b:?}"
        );
        assert!(f.left_minus_right < -0.02);
        assert!(f.asymmetry > 0.05);
        let t = f.to_text();
        assert!(
            t.contains("upper right") && t.contains("image-right side brighter"),
            "{t}"
        );
    }

    #[test]
    fn flat_image_has_no_regions_and_is_symmetric() {
        let f = Findings::measure(&GrayImage::from_pixel(64, 48, image::Luma([128])));
        assert!(f.bright.is_none() && f.dark.is_none());
        assert!(f.asymmetry < 1e-9 && f.std < 1e-9);
        assert!(f.to_text().contains("nearly symmetric"));
        // The native size is an acquisition property that can give the class away.
        assert!(!f.to_text().contains("64") && !f.to_text().contains("48"), "{}", f.to_text());
    }
}
