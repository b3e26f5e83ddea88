//! Image preparation for the wire: downscale to a maximum side and encode as PNG.

use image::GrayImage;
use sha2::{Digest, Sha256};

/// PNG bytes of `img`, downscaled so its longer side is at most `max_side` (OpenAI's
/// `detail: low` looks at 512x512 anyway, so sending more only costs bandwidth).
pub fn encode_png(img: &GrayImage, max_side: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let resized;
    let src = if max_side > 0 && w.max(h) > max_side {
        let s = max_side as f64 / w.max(h) as f64;
        let (nw, nh) = (
            ((w as f64 * s).round() as u32).max(1),
            ((h as f64 * s).round() as u32).max(1),
        );
        resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
        &resized
    } else {
        img
    };
    let mut out = Vec::with_capacity((src.width() * src.height()) as usize / 2 + 64);
    // Fast compression: the image is sent once, and encode time is per-request overhead.
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    );
    image::ImageEncoder::write_image(
        enc,
        src.as_raw(),
        src.width(),
        src.height(),
        image::ExtendedColorType::L8,
    )
    .expect("encoding a grey image into memory cannot fail");
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscales_and_round_trips() {
        let img = GrayImage::from_fn(300, 150, |x, y| image::Luma([((x + y) % 256) as u8]));
        let png = encode_png(&img, 100);
        let back = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(back.dimensions(), (100, 50));
        let small = GrayImage::from_pixel(20, 10, image::Luma([7]));
        let back = image::load_from_memory(&encode_png(&small, 100))
            .unwrap()
            .to_luma8();
        assert_eq!(back, small);
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
