//! Image to model input: decode as everywhere in mica, stretch to the input size, scale and
//! standardise, lay out as the graph wants.

use image::imageops::FilterType;
use mica_core::ImageSource;

use crate::model::Preprocess;
use crate::sidecar::{Channels, Resize, TensorLayout};
use crate::OnnxError;

/// One image at the model's input size, channel-major (`C x H x W`), raw values 0..=255 before
/// scaling; [`to_input`] turns it into what the graph takes. Kept apart so the occlusion map
/// can grey out patches in pixel space.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Decodes and resizes one image. Grayscale files, DICOM (windowed by mica-data, the decoder
/// the CNN and LLM arms use) and in-memory uploads are read as gray; with `channels = "rgb"` a
/// colour PNG/JPEG keeps its colours. Gray is replicated when the graph takes 3 channels.
pub fn decode(pre: &Preprocess, source: &ImageSource) -> Result<Pixels, OnnxError> {
    let img_err = |message: String| OnnxError::Image { path: source.path().to_path_buf(), message };
    let (h, w) = (pre.height as u32, pre.width as u32);
    let filter = match pre.resize {
        Resize::Bilinear => FilterType::Triangle,
        Resize::Nearest => FilterType::Nearest,
    };
    let colour = match source {
        ImageSource::File { path } if pre.channels == Channels::Rgb && pre.graph_channels == 3 && !mica_data::image::is_dicom_path(path) => {
            Some(image::open(path).map_err(|e| img_err(e.to_string()))?.to_rgb8())
        }
        _ => None,
    };
    let hw = (h * w) as usize;
    let mut data = vec![0.0f32; pre.graph_channels * hw];
    match colour {
        Some(rgb) => {
            let r = image::imageops::resize(&rgb, w, h, filter);
            for (i, p) in r.pixels().enumerate() {
                for c in 0..3 {
                    data[c * hw + i] = p.0[c] as f32;
                }
            }
        }
        None => {
            let g = mica_data::image::load_gray(source).map_err(|e| img_err(e.to_string()))?;
            let r = image::imageops::resize(&g, w, h, filter);
            for c in 0..pre.graph_channels {
                for (o, p) in data[c * hw..(c + 1) * hw].iter_mut().zip(r.pixels()) {
                    *o = p.0[0] as f32;
                }
            }
        }
    }
    Ok(Pixels { channels: pre.graph_channels, height: pre.height, width: pre.width, data })
}

/// `pixel / scale`, then `(x - mean) / std` per channel, in the graph's layout; appended to `out`.
pub fn to_input(pre: &Preprocess, px: &Pixels, out: &mut Vec<f32>) {
    let hw = px.height * px.width;
    let c = px.channels;
    let norm = |ch: usize, v: f32| (v / pre.scale - pre.mean[ch]) / pre.std[ch];
    match pre.layout {
        TensorLayout::Nchw => {
            for ch in 0..c {
                out.extend(px.data[ch * hw..(ch + 1) * hw].iter().map(|&v| norm(ch, v)));
            }
        }
        TensorLayout::Nhwc => {
            out.reserve(c * hw);
            for i in 0..hw {
                for ch in 0..c {
                    out.push(norm(ch, px.data[ch * hw + i]));
                }
            }
        }
    }
}
