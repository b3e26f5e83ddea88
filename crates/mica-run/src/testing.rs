//! Test doubles built from the providers' documented wire formats, for this crate's tests and
//! the CLI's (feature `testing`). Not part of the engine. The HTTP stub itself lives in
//! `mica_llm::testing`.

pub use mica_llm::testing::Server;

/// OpenAI's documented answer to a wrong key.
pub const INVALID_KEY: &str = r#"{"error":{"message":"Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;

/// A documented `chat.completion` object whose message names `label`.
pub fn completion(label: &str) -> String {
    let content = serde_json::json!({"label": label, "confidence": 0.9, "rationale": "pattern"}).to_string();
    serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    })
    .to_string()
}


/// The four pattern classes of [`tiny_dataset`].
pub const CLASSES: [&str; 4] = ["bright", "dark", "left", "top"];

/// An image-folder dataset of 4 classes x `per_class` 16x16 PNGs: class-specific patterns plus
/// noise from `seed`; every `weak_every`-th image has strong noise, so a pixel baseline makes
/// some mistakes and the metrics are not trivially perfect.
pub fn tiny_dataset(root: &std::path::Path, per_class: usize, seed: u64, weak_every: usize) {
    let mut state: u64 = seed;
    let mut noise = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 256) as i32
    };
    for (c, name) in CLASSES.iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let strength = if i % weak_every == 0 { 2 } else { 6 };
            let img = image::GrayImage::from_fn(16, 16, |x, y| {
                let base: i32 = match c {
                    0 => 190,
                    1 => 60,
                    2 => if x < 8 { 200 } else { 50 },
                    _ => if y < 8 { 200 } else { 50 },
                };
                image::Luma([(base + (noise() - 128) * strength / 4).clamp(0, 255) as u8])
            });
            img.save(dir.join(format!("{name}_{i:03}.png"))).unwrap();
        }
    }
}
