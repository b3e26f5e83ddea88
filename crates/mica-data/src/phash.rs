//! Perceptual hashes for near-duplicate detection.
//!
//! The public chest X-ray and brain MRI sets were merged from several sources and contain the
//! same scan more than once, sometimes resized or re-encoded; when copies land in both train
//! and test, published accuracies are inflated. A DCT hash (pHash) survives resizing,
//! re-compression and brightness changes, which byte hashes do not.

use image::GrayImage;

use crate::image::resize_gray;

/// 64-bit pHash: the image shrunk to 32x32, its 2-D DCT, and one bit per coefficient of the
/// 8x8 lowest frequencies (DC excluded) telling whether it is above their median.
pub fn phash(img: &GrayImage) -> u64 {
    const N: usize = 32;
    let small = resize_gray(img, N as u32, N as u32);
    let px: Vec<f64> = small.as_raw().iter().map(|&v| v as f64).collect();
    // cos table: c[u][x] = cos((2x+1) u pi / 2N)
    let mut c = [[0f64; N]; 8];
    for (u, row) in c.iter_mut().enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            *v = (((2 * x + 1) * u) as f64 * std::f64::consts::PI / (2 * N) as f64).cos();
        }
    }
    // Rows first (8 frequencies per row), then columns.
    let mut rows = vec![[0f64; 8]; N];
    for y in 0..N {
        for u in 0..8 {
            rows[y][u] = (0..N).map(|x| px[y * N + x] * c[u][x]).sum();
        }
    }
    let mut coeffs = [0f64; 64];
    for v in 0..8 {
        for u in 0..8 {
            coeffs[v * 8 + u] = (0..N).map(|y| rows[y][u] * c[v][y]).sum();
        }
    }
    let mut ac: Vec<f64> = coeffs[1..].to_vec();
    ac.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let median = (ac[31] + ac[32]) / 2.0;
    let mut h = 0u64;
    for (i, &v) in coeffs.iter().enumerate().skip(1) {
        if v > median {
            h |= 1 << i;
        }
    }
    h
}

/// A 32x32 thumbnail standardised to zero mean and unit variance: the second opinion on a
/// pHash match. Scans of different patients share anatomy and can collide in 64 hash bits;
/// a true copy (resized, re-encoded, brightened) still matches pixel for pixel.
pub fn thumbnail(img: &GrayImage) -> Vec<f32> {
    let small = resize_gray(img, 32, 32);
    let v: Vec<f32> = small.as_raw().iter().map(|&x| x as f32).collect();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
    let sd = var.sqrt().max(1e-3);
    v.iter().map(|x| (x - mean) / sd).collect()
}

/// Pearson correlation of two thumbnails from [`thumbnail`].
pub fn correlation(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / a.len() as f32
}

pub fn distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Pairs `(i, j, distance)` with `i < j` whose hashes differ in at most `max_distance` bits.
/// Quadratic, but a popcount per pair: 20,000 images take well under a second.
pub fn near_pairs(hashes: &[u64], max_distance: u32) -> Vec<(usize, usize, u32)> {
    use rayon::prelude::*;
    (0..hashes.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            let hi = hashes[i];
            hashes[i + 1..].iter().enumerate().filter_map(move |(k, &hj)| {
                let d = distance(hi, hj);
                (d <= max_distance).then_some((i, i + 1 + k, d))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(shift: u32, bright: i32) -> GrayImage {
        GrayImage::from_fn(128, 128, |x, y| {
            let dx = x as f64 - 50.0 - shift as f64;
            let dy = y as f64 - 70.0;
            let blob = if dx * dx + dy * dy < 600.0 { 120.0 } else { 0.0 };
            let v = 40.0 + (x as f64) * 0.6 + blob + bright as f64;
            image::Luma([v.clamp(0.0, 255.0) as u8])
        })
    }

    #[test]
    fn resized_and_brightened_copy_is_near_and_other_image_is_far() {
        let a = scene(0, 0);
        let copy = resize_gray(&scene(0, 20), 80, 80);
        let other = GrayImage::from_fn(128, 128, |x, y| image::Luma([(((x / 16) + (y / 16)) % 2 * 200) as u8]));
        assert!(distance(phash(&a), phash(&copy)) <= 4, "{}", distance(phash(&a), phash(&copy)));
        assert!(distance(phash(&a), phash(&other)) > 16);
    }

    #[test]
    fn near_pairs_finds_only_close_hashes() {
        let pairs = near_pairs(&[0b0000, 0b0001, 0xffff_0000, 0b0011], 1);
        assert_eq!(pairs, vec![(0, 1, 1), (1, 3, 1)]);
    }
}
