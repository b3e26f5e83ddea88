//! Test doubles built from the providers' documented wire formats, for this crate's tests and
//! the CLI's (feature `testing`). Not part of the engine.

/// A stand-in for an OpenAI-compatible server, built from OpenAI's documented wire format: it
/// answers `POST /v1/chat/completions` with `answer(request_number)` (status, JSON body) and
/// counts requests.
pub struct Server {
    pub url: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(answer: impl Fn(usize) -> (u16, String) + Send + 'static) -> Server {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = requests.clone();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                seen.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (status, json) = answer(n);
                let reason = if status == 200 { "OK" } else { "Error" };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
            }
        });
        Server { url, requests, bodies }
    }

    /// Every request body received so far (the prompts as sent).
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

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
