//! A stand-in HTTP server for tests of provider clients, answering from the providers'
//! documented responses (for this crate's tests and, with feature `testing`, other crates').

/// One request as the stub saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Arrival number, from 0 over all paths.
    pub n: usize,
    pub method: String,
    /// The request target (`/api/tags`, `/v1/chat/completions`).
    pub path: String,
    /// Header names (lowercase) and values in arrival order, so tests can check what a
    /// client authenticated with (`authorization`, `api-key`, `x-api-key`, ...).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    /// The value of header `name` (case-insensitive), if the request carried it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A full answer: status, extra response headers (`retry-after`) and a body sent as is.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Answer = dyn Fn(&Request) -> Reply + Send + 'static;

/// Answers every request with a (status, JSON body) of the test's choosing, counts requests
/// and keeps them.
pub struct Server {
    pub url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
}

impl Server {
    /// Answers every request (any path) with `answer(request_number)`.
    pub fn start(answer: impl Fn(usize) -> (u16, String) + Send + 'static) -> Server {
        Server::start_routed(move |r: &Request| answer(r.n))
    }

    /// Answers each request with `answer(request)`, so one stub can serve several endpoints
    /// of an API (Ollama's `/api/tags` and `/api/chat`).
    pub fn start_routed(answer: impl Fn(&Request) -> (u16, String) + Send + 'static) -> Server {
        Server::start_replies(move |r: &Request| {
            let (status, body) = answer(r);
            Reply::new(status, body)
        })
    }

    /// Answers each request with a full [`Reply`], for answers that carry headers
    /// (`retry-after`) or bodies that are not JSON.
    pub fn start_replies(answer: impl Fn(&Request) -> Reply + Send + 'static) -> Server {
        use std::io::{BufRead, BufReader, Read, Write};
        let answer: Box<Answer> = Box::new(answer);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let mut words = request_line.split_whitespace();
                let method = words.next().unwrap_or_default().to_string();
                let path = words.next().unwrap_or_default().to_string();
                let mut len = 0usize;
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                        if k == "content-length" {
                            len = v.parse().unwrap_or(0);
                        }
                        headers.push((k, v));
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let req = {
                    let mut all = seen.lock().unwrap();
                    let req = Request {
                        n: all.len(),
                        method,
                        path,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    all.push(req.clone());
                    req
                };
                let Reply {
                    status,
                    headers,
                    body: json,
                } = answer(&req);
                let reason = if status == 200 { "OK" } else { "Error" };
                let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
            }
        });
        Server { url, requests }
    }

    /// Every request body received so far (the prompts as sent).
    pub fn bodies(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// Every request received so far, with its headers.
    pub fn received(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// How many requests went to `path`.
    pub fn requests_to(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }
}
