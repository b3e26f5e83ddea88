//! Occlusion maps: where the model looks, without gradients.
//!
//! Grad-CAM differentiates the class score; tract runs ONNX graphs forward only, so for ONNX
//! models mica slides a patch of the image's mean grey over the input and records how much
//! the explained class's probability drops with each part of the image hidden (Zeiler &
//! Fergus, 2014). It costs one forward pass per patch position, and says where the evidence
//! is, not how the network computes with it.

use mica_core::{Classifier, ImageSource};

use crate::classifier::{argmax, OnnxClassifier};
use crate::OnnxError;

/// What every occlusion map says about itself, on the overlay's caption, in JSON and printed.
pub const METHOD: &str = "occlusion map (ONNX model: no gradients)";

/// An occlusion map for one image.
#[derive(Debug, Clone)]
pub struct OcclusionMap {
    /// The explained class (the predicted one unless another was asked for).
    pub label: String,
    pub predicted: String,
    pub confidence: f64,
    pub probabilities: Vec<(String, f64)>,
    /// Per input pixel (`height x width`, row-major): the mean drop of the explained class's
    /// probability over the patches covering it, clamped at 0 and scaled to `[0, 1]`
    /// (all zero when hiding no patch lowers it).
    pub map: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// Side of the square patch and the step between patches, in input pixels.
    pub patch: usize,
    pub stride: usize,
    /// The largest drop of the explained class's probability any one patch caused (unscaled).
    pub max_drop: f64,
    /// Forward passes run.
    pub passes: usize,
}

/// Explains `source` with an occlusion map; `target` picks a class by (mica) name, `None`
/// explains the predicted class. `patch` defaults to an eighth of the longer input side.
pub fn occlusion(
    clf: &OnnxClassifier,
    source: &ImageSource,
    target: Option<&str>,
    patch: Option<usize>,
) -> Result<OcclusionMap, OnnxError> {
    let labels = clf.labels().clone();
    let px = clf.decode(source)?;
    let base = clf.probabilities(std::slice::from_ref(&px))?.remove(0);
    let pred = argmax(&base);
    let class = match target {
        Some(name) => labels.index_of(name).ok_or_else(|| OnnxError::Usage(format!(
            "unknown class `{name}` (the model's classes: {})",
            labels.names().join(", ")
        )))?,
        None => pred,
    };
    let (h, w, c) = (px.height, px.width, px.channels);
    let patch = patch.unwrap_or((h.max(w) / 8).max(1)).clamp(1, h.min(w));
    let stride = (patch / 2).max(1);
    let hw = h * w;
    let fill: Vec<f32> = (0..c).map(|ch| px.data[ch * hw..(ch + 1) * hw].iter().sum::<f32>() / hw as f32).collect();
    let starts = |len: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..=len - patch).step_by(stride).collect();
        if *v.last().expect("len >= patch") != len - patch {
            v.push(len - patch);
        }
        v
    };
    let positions: Vec<(usize, usize)> = starts(h).into_iter().flat_map(|y| starts(w).into_iter().map(move |x| (y, x))).collect();
    let mut sum = vec![0.0f32; hw];
    let mut count = vec![0u32; hw];
    let mut max_drop = 0.0f32;
    for group in positions.chunks(32) {
        let images: Vec<crate::Pixels> = group
            .iter()
            .map(|&(y0, x0)| {
                let mut o = px.clone();
                for (ch, &grey) in fill.iter().enumerate() {
                    for y in y0..y0 + patch {
                        o.data[ch * hw + y * w + x0..ch * hw + y * w + x0 + patch].fill(grey);
                    }
                }
                o
            })
            .collect();
        let probs = clf.probabilities(&images)?;
        for (&(y0, x0), p) in group.iter().zip(&probs) {
            let drop = base[class] - p[class];
            max_drop = max_drop.max(drop);
            for y in y0..y0 + patch {
                for x in x0..x0 + patch {
                    sum[y * w + x] += drop;
                    count[y * w + x] += 1;
                }
            }
        }
    }
    let mut map: Vec<f32> = sum.iter().zip(&count).map(|(s, &n)| if n > 0 { (s / n as f32).max(0.0) } else { 0.0 }).collect();
    let top = map.iter().cloned().fold(0.0f32, f32::max);
    if top > 0.0 {
        map.iter_mut().for_each(|v| *v /= top);
    }
    Ok(OcclusionMap {
        label: labels.name(class).to_string(),
        predicted: labels.name(pred).to_string(),
        confidence: base[pred] as f64,
        probabilities: (0..labels.len()).map(|i| (labels.name(i).to_string(), base[i] as f64)).collect(),
        map,
        height: h,
        width: w,
        patch,
        stride,
        max_drop: max_drop.max(0.0) as f64,
        passes: positions.len() + 1,
    })
}
