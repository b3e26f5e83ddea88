//! Grad-CAM: where in the image the network looked for its answer.
//!
//! The class score is differentiated with respect to the last convolutional feature map; the
//! spatially averaged gradients weigh the feature channels, and the ReLU of the weighted sum,
//! upsampled to the image, is the heat map (Selvaraju et al., 2017). The feature map is taken
//! from the inference-mode network (batch norm with running statistics) and re-entered into the
//! autodiff graph as a leaf, so only the head is differentiated.

use std::io::Cursor;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use image::{DynamicImage, Rgb, RgbImage};
use mica_core::write_atomic;

use crate::checkpoint::Checkpoint;
use crate::data;
use crate::{CnnError, CpuTrainBackend};

/// A Grad-CAM result for one image.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The explained class (the predicted one unless another was asked for).
    pub label: String,
    pub predicted: String,
    pub confidence: f64,
    pub probabilities: Vec<(String, f64)>,
    /// Heat map at the network's input size, row-major, scaled to `[0, 1]`.
    pub cam: Vec<f32>,
    pub cam_size: usize,
    /// The resolution of the last feature map (how coarse the map really is).
    pub feature_size: (usize, usize),
}

/// Computes Grad-CAM for `image` with the checkpoint in `run_dir`. `target` picks a class by
/// name; `None` explains the predicted class.
pub fn explain(run_dir: &Path, image_path: &Path, target: Option<&str>) -> Result<Explanation, CnnError> {
    explain_source(run_dir, &mica_core::ImageSource::file(image_path), target)
}

/// [`explain`] for any image source, e.g. an upload the web app holds in memory only.
pub fn explain_source(
    run_dir: &Path,
    source: &mica_core::ImageSource,
    target: Option<&str>,
) -> Result<Explanation, CnnError> {
    type Ad = CpuTrainBackend;
    let device = Default::default();
    let ckpt = Checkpoint::<Ad>::load(run_dir, &device)?;
    let meta = &ckpt.meta;
    let size = meta.input_size;
    let (mut px, _) = data::load_image(source, size, meta.in_channels)?;
    meta.normalization.apply(&mut px, size);
    let x = Tensor::<crate::CpuBackend, 4>::from_data(
        TensorData::new(px, [1, meta.in_channels, size, size]),
        &device,
    );
    let features = ckpt.model.valid().features(x);
    let [_, _, fh, fw] = features.dims();
    let leaf = Tensor::<Ad, 4>::from_inner(features.clone()).require_grad();
    let logits = ckpt.model.head(leaf.clone(), None);
    let probs: Vec<f32> = softmax(logits.clone().inner(), 1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data");
    let mut pred = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > probs[pred] {
            pred = i;
        }
    }
    let class = match target {
        Some(name) => meta.labels.index_of(name).ok_or_else(|| CnnError::Config(format!(
            "unknown class `{name}` (the checkpoint's classes: {})",
            meta.labels.names().join(", ")
        )))?,
        None => pred,
    };
    let k = meta.labels.len();
    let score = logits.slice([0..1, class..class + 1]).sum();
    let grads = score.backward();
    let g = leaf.grad(&grads).ok_or_else(|| CnnError::Config("no gradient reached the feature map".into()))?;
    // alpha_k = mean over positions of d score / d A_k; cam = relu(sum_k alpha_k A_k).
    let alpha = g.mean_dim(3).mean_dim(2); // [1, C, 1, 1]
    let cam = (features * alpha).sum_dim(1).clamp_min(0.0); // [1, 1, h, w]
    let cam: Vec<f32> = cam.into_data().convert::<f32>().to_vec().expect("f32 data");
    let cam = upsample(&cam, fh, fw, size);
    let max = cam.iter().cloned().fold(0.0f32, f32::max);
    let cam = if max > 0.0 { cam.iter().map(|v| v / max).collect() } else { cam };
    Ok(Explanation {
        label: meta.labels.name(class).to_string(),
        predicted: meta.labels.name(pred).to_string(),
        confidence: probs[pred] as f64,
        probabilities: (0..k).map(|i| (meta.labels.name(i).to_string(), probs[i] as f64)).collect(),
        cam,
        cam_size: size,
        feature_size: (fh, fw),
    })
}

/// Bilinear upsampling of an `h x w` map to `size x size` (align-corners style).
pub fn upsample(map: &[f32], h: usize, w: usize, size: usize) -> Vec<f32> {
    let mut out = vec![0.0; size * size];
    for y in 0..size {
        let fy = if size > 1 { y as f32 * (h as f32 - 1.0) / (size as f32 - 1.0) } else { 0.0 };
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let ty = fy - y0 as f32;
        for x in 0..size {
            let fx = if size > 1 { x as f32 * (w as f32 - 1.0) / (size as f32 - 1.0) } else { 0.0 };
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(w - 1);
            let tx = fx - x0 as f32;
            let a = map[y0 * w + x0] * (1.0 - tx) + map[y0 * w + x1] * tx;
            let b = map[y1 * w + x0] * (1.0 - tx) + map[y1 * w + x1] * tx;
            out[y * size + x] = a * (1.0 - ty) + b * ty;
        }
    }
    out
}

/// The "jet" colour map, from blue (0) through green to red (1).
fn jet(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r, g, b]
}

/// Blends the heat map over the original image at the image's own resolution.
pub fn overlay(original: &DynamicImage, e: &Explanation, alpha: f32) -> RgbImage {
    let gray = original.to_rgb8();
    let (w, h) = gray.dimensions();
    let mut out = RgbImage::new(w, h);
    let s = e.cam_size;
    for y in 0..h {
        for x in 0..w {
            // Sample the cam at the corresponding input-size position.
            let cx = ((x as f32 + 0.5) * s as f32 / w as f32).min(s as f32 - 1.0) as usize;
            let cy = ((y as f32 + 0.5) * s as f32 / h as f32).min(s as f32 - 1.0) as usize;
            let v = e.cam[cy * s + cx];
            let c = jet(v);
            let p = gray.get_pixel(x, y).0;
            // Weak activations stay mostly transparent so the anatomy remains readable.
            let a = alpha * (0.25 + 0.75 * v);
            let mix = |i: usize| ((1.0 - a) * p[i] as f32 + a * 255.0 * c[i]).round().clamp(0.0, 255.0) as u8;
            out.put_pixel(x, y, Rgb([mix(0), mix(1), mix(2)]));
        }
    }
    out
}

/// Explains `image_path` and writes the overlay PNG to `out` (atomically).
pub fn explain_to_png(
    run_dir: &Path,
    image_path: &Path,
    target: Option<&str>,
    out: &Path,
) -> Result<Explanation, CnnError> {
    let e = explain(run_dir, image_path, target)?;
    let original = image::open(image_path).map_err(|err| CnnError::Image {
        path: image_path.to_path_buf(),
        message: err.to_string(),
    })?;
    let img = overlay(&original, &e, 0.5);
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|err| CnnError::Image { path: out.to_path_buf(), message: err.to_string() })?;
    write_atomic(out, &bytes)?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsample_keeps_corners_and_interpolates() {
        let m = [0.0, 1.0, 2.0, 3.0];
        let u = upsample(&m, 2, 2, 3);
        assert_eq!(u[0], 0.0);
        assert_eq!(u[2], 1.0);
        assert_eq!(u[8], 3.0);
        assert!((u[4] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn jet_runs_blue_to_red() {
        assert!(jet(0.0)[2] > 0.4 && jet(0.0)[0] == 0.0);
        assert!(jet(1.0)[0] > 0.4 && jet(1.0)[2] == 0.0);
    }
}
