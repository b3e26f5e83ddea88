//! Identity and deployment defaults over real HTTP on loopback: named users and roles, POST
//! sign-in with a session cookie, sign-out, the trusted proxy header, the Host allow-list,
//! same-origin POSTs, local-only redirects, and a note that stays text.

mod common;

use std::net::SocketAddr;

use mica_core::Modality;
use mica_server::auth::{self, Role, TrustedProxy, Users};
use mica_server::{AccessConfig, App, LlmOptions, Panel, Settings};
use reqwest::header::{HeaderMap, CONTENT_TYPE, COOKIE, HOST, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const PHYSICIAN: (&str, &str) = ("Dr Ada Lovelace", "physician-secret-1842");
const VIEWER: (&str, &str) = ("Vic Viewer", "viewer-secret-of-20c");
const XSS: &str = "<img src=x onerror=alert(1)><script>alert('note')</script>";

struct Server {
    _tmp: tempfile::TempDir,
    store: std::path::PathBuf,
    base: String,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn users() -> Users {
    let text = auth::add_user("", PHYSICIAN.0, Role::Physician, PHYSICIAN.1).unwrap();
    let text = auth::add_user(&text, VIEWER.0, Role::Viewer, VIEWER.1).unwrap();
    Users::parse(&text).unwrap()
}

async fn start(token: Option<&str>, access: AccessConfig) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let panel = Panel::load(&[format!("cnn:{}", run.display())], None, &LlmOptions::default(), &meter).unwrap();
    let store = tmp.path().join("store.sqlite");
    let st = mica_report::Store::open(&store).unwrap();
    let settings = Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: token.map(String::from) };
    let app = App::new(panel, st, settings).unwrap().with_access(access).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mica_server::serve(listener, app, async move {
        let _ = rx.await;
    }));
    let http = Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Server { _tmp: tmp, store, base: format!("http://{addr}"), addr, stop: Some(tx), http }
}

fn png(seed: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(48, 40, |x, y| image::Luma([((x * 5 + y * 3 + seed * 17) % 256) as u8]));
    mica_data::image::png_bytes(&img)
}

const BOUNDARY: &str = "mica-security-test-4d1c";

/// A multipart/form-data request body with `bytes` as the `file` part.
fn upload_body(bytes: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(bytes);
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect()
    };
    pairs.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn sign_in_form(&self, pairs: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(self.url("/sign-in"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ORIGIN, &self.base)
            .body(form(pairs))
            .send()
            .await
            .unwrap()
    }

    /// Signs in by form and returns the `name=value` cookie pair and the whole Set-Cookie.
    async fn session(&self, name: &str, secret: &str) -> (String, String) {
        let r = self.sign_in_form(&[("name", name), ("secret", secret), ("next", "/")]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers().get(SET_COOKIE).unwrap().to_str().unwrap().to_string();
        (set.split(';').next().unwrap().to_string(), set)
    }

    async fn upload(&self, cookie: &str) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/classify"))
            .header(COOKIE, cookie)
            .header(ORIGIN, &self.base)
            .header(CONTENT_TYPE, multipart_type())
            .body(upload_body(&png(3)))
            .send()
            .await
            .unwrap()
    }

    async fn decide(&self, cookie: &str, id: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/api/v1/cases/{id}/decision")))
            .header(COOKIE, cookie)
            .header(ORIGIN, &self.base)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str, headers: HeaderMap) -> reqwest::Response {
        self.http.get(self.url(path)).headers(headers).send().await.unwrap()
    }

    /// Polls the case until every classifier is done (answers arrive as they come).
    async fn wait_complete(&self, cookie: &str, id: &str) -> Value {
        for _ in 0..200 {
            let c: Value = self.get(&format!("/api/v1/cases/{id}"), cookie_headers(cookie)).await.json().await.unwrap();
            if c["complete"] != json!(false) {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("case {id} never completed");
    }
}

fn cookie_headers(cookie: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(COOKIE, cookie.parse().unwrap());
    h
}

async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physician_decides_under_their_name_and_a_viewer_only_reads() {
    let s = start(None, AccessConfig { users: Some(users()), secure_cookies: true, ..Default::default() }).await;

    // Nothing without signing in; a GET with credentials in the address signs no one in.
    assert_eq!(s.get("/api/v1/health", HeaderMap::new()).await.status(), StatusCode::UNAUTHORIZED);
    let page = s.get("/", HeaderMap::new()).await;
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    let html = page.text().await.unwrap();
    assert!(html.contains("method=\"post\"") && html.contains("name=\"secret\""), "{html}");
    let q = form(&[("name", PHYSICIAN.0), ("secret", PHYSICIAN.1)]);
    for path in [format!("/sign-in?{q}"), format!("/?{q}")] {
        let r = s.get(&path, HeaderMap::new()).await;
        assert!(r.headers().get(SET_COOKIE).is_none(), "{path}: a GET never signs in");
        assert_ne!(r.status(), StatusCode::SEE_OTHER, "{path}");
    }

    // A wrong secret is refused with the form again.
    let r = s.sign_in_form(&[("name", PHYSICIAN.0), ("secret", "not-the-secret"), ("next", "/")]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert!(r.text().await.unwrap().contains("wrong secret"));

    // The physician: a session cookie with the protective flags.
    let (ada, set) = s.session(PHYSICIAN.0, PHYSICIAN.1).await;
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/", "Max-Age="] {
        assert!(set.contains(flag), "{flag} missing from {set}");
    }
    assert!(ada.starts_with("mica_session=") && ada.len() == "mica_session=".len() + 64, "{ada}");
    let health: Value = s.get("/api/v1/health", cookie_headers(&ada)).await.json().await.unwrap();
    assert_eq!(health["auth"]["user"], PHYSICIAN.0);
    assert_eq!(health["auth"]["role"], "physician");
    assert_eq!(health["auth"]["identity"], true);

    let up = s.upload(&ada).await;
    assert_eq!(up.status(), StatusCode::CREATED);
    let id = up.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    s.wait_complete(&ada, &id).await;
    // Another name than the signed-in user's is refused; none at all records the user.
    let r = s.decide(&ada, &id, json!({"final_label": "glioma", "reviewer": "Dr Mallory"})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(r).await, "reviewer_mismatch");
    let r = s.decide(&ada, &id, json!({"final_label": "glioma", "note": XSS})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["decision"]["reviewer"], PHYSICIAN.0);
    assert_eq!(d["decision"]["user_id"], PHYSICIAN.0);
    assert_eq!(d["decision"]["auth_method"], "users-file");
    assert_eq!(d["decision"]["note"], XSS, "the API returns the note as data");

    // The viewer reads the case but cannot decide or upload.
    let json_sign_in = s
        .http
        .post(s.url("/sign-in"))
        .json(&json!({"name": VIEWER.0, "secret": VIEWER.1}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_sign_in.status(), StatusCode::OK);
    let vic = json_sign_in.headers().get(SET_COOKIE).unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    let me: Value = json_sign_in.json().await.unwrap();
    assert_eq!((me["user"].as_str(), me["role"].as_str()), (Some(VIEWER.0), Some("viewer")));
    assert_eq!(s.get(&format!("/api/v1/cases/{id}"), cookie_headers(&vic)).await.status(), StatusCode::OK);
    let r = s.decide(&vic, &id, json!({"final_label": "no_tumor"})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "forbidden");
    assert_eq!(s.upload(&vic).await.status(), StatusCode::FORBIDDEN);

    // The store holds the physician's identity; the viewer left no decision.
    let st = mica_report::Store::open(&s.store).unwrap();
    let trail = st.decisions(&id).unwrap();
    assert_eq!(trail.len(), 1);
    assert_eq!(trail[0].reviewer, PHYSICIAN.0);
    assert_eq!(trail[0].user_id.as_deref(), Some(PHYSICIAN.0));
    assert_eq!(trail[0].auth_method.as_deref(), Some("users-file"));

    // The note never reaches a page as markup: pages carry no case data at all (the script
    // puts it in with textContent), and API answers are JSON that browsers will not sniff.
    for path in [format!("/cases/{id}"), "/monitoring".into()] {
        let r = s.get(&path, cookie_headers(&ada)).await;
        assert_eq!(r.status(), StatusCode::OK);
        let html = r.text().await.unwrap();
        assert!(!html.contains("onerror=alert") && !html.contains("alert('note')"), "{path}");
    }
    let r = s.get("/api/v1/monitoring", cookie_headers(&ada)).await;
    assert!(r.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");

    // Sign-out ends the session on the server, whatever the browser keeps.
    let out = s.http.post(s.url("/sign-out")).header(COOKIE, &ada).header(ORIGIN, &s.base).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(s.get("/api/v1/health", cookie_headers(&ada)).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sign_in_only_local_paths_are_followed() {
    let s = start(None, AccessConfig { users: Some(users()), ..Default::default() }).await;
    for (next, expected) in [
        ("/monitoring", "/monitoring"),
        ("/cases/0123456789abcdef0123456789abcdef", "/cases/0123456789abcdef0123456789abcdef"),
        ("//evil.host/", "/"),
        ("/\\evil", "/"),
        ("/\\/evil.host", "/"),
        ("https://evil.host/x", "/"),
        ("javascript:alert(1)", "/"),
    ] {
        let r = s.sign_in_form(&[("name", PHYSICIAN.0), ("secret", PHYSICIAN.1), ("next", next)]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(r.headers()[LOCATION], expected, "{next}");
        assert!(r.headers()[SET_COOKIE].to_str().unwrap().starts_with("mica_session="));
    }
    // The form never reflects a foreign `next`, escaped or not.
    let r = s.get("/sign-in?next=%2F%2Fevil.host%2F%22%3E%3Cscript%3E", HeaderMap::new()).await;
    let html = r.text().await.unwrap();
    assert!(!html.contains("evil.host") && !html.contains("<script>\""), "{html}");
    assert!(html.contains("name=\"next\" value=\"/\""));
    // A page asked for without a session comes back to itself after sign-in, escaped.
    let html = s.get("/monitoring?x=%22%3E%3Cb%3E", HeaderMap::new()).await.text().await.unwrap();
    assert!(html.contains("value=\"/monitoring?x=%22%3E%3Cb%3E\""), "{html}");
    assert!(!html.contains("\"><b>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_posts_and_foreign_hosts_are_refused() {
    // Even an open loopback server (the default) refuses both: any web page can reach it.
    let s = start(None, AccessConfig { allowed_hosts: vec!["mica.hospital.example".into()], ..Default::default() }).await;
    let post = |origin: Option<&'static str>| {
        let mut b = s.http.post(s.url("/api/v1/classify")).header(CONTENT_TYPE, multipart_type()).body(upload_body(&png(5)));
        if let Some(o) = origin {
            b = b.header(ORIGIN, o);
        }
        b.send()
    };
    let r = post(Some("http://evil.example")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "cross_origin");
    let r = s.http.post(s.url("/api/v1/classify")).header("sec-fetch-site", "cross-site").body("x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let own = format!("http://{}", s.addr);
    let r = s.http.post(s.url("/api/v1/classify")).header(ORIGIN, &own).header(CONTENT_TYPE, multipart_type()).body(upload_body(&png(5)));
    assert_eq!(r.send().await.unwrap().status(), StatusCode::CREATED, "this server's own origin");
    assert_eq!(post(None).await.unwrap().status(), StatusCode::CREATED, "a client that is not a browser");

    // Host: names from the list and IP literals only (a rebound name is refused).
    for (host, ok) in [
        ("evil.example", false),
        ("evil.example:80", false),
        ("localhost.evil.example", false),
        ("localhost", true),
        ("mica.hospital.example", true),
    ] {
        let mut h = HeaderMap::new();
        h.insert(HOST, format!("{host}:{}", s.addr.port()).parse().unwrap());
        let r = s.get("/api/v1/health", h).await;
        if ok {
            assert_eq!(r.status(), StatusCode::OK, "{host}");
        } else {
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{host}");
            assert_eq!(error_code(r).await, "host_not_allowed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_token_must_be_long_and_signs_in_by_post() {
    for bad in ["", "   ", "short-token"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("cnn");
        common::write_checkpoint(&run, Modality::Mri);
        let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
        let panel = Panel::load(&[format!("cnn:{}", run.display())], None, &LlmOptions::default(), &meter).unwrap();
        let st = mica_report::Store::open(tmp.path().join("s.sqlite")).unwrap();
        let settings = Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: Some(bad.into()) };
        let e = App::new(panel, st, settings).err().expect("a weak token is refused").to_string();
        assert!(e.contains("MICA_SERVE_TOKEN") && (e.contains("empty") || e.contains("at least 16")), "{e}");
    }
    let token = "a-long-enough-shared-token";
    let s = start(Some(token), AccessConfig::default()).await;
    let r = s.http.post(s.url("/sign-in")).json(&json!({"token": token})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let c = r.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_string();
    let h: Value = s.get("/api/v1/health", cookie_headers(&c)).await.json().await.unwrap();
    assert_eq!((h["auth"]["mode"].as_str(), h["auth"]["identity"].as_bool()), (Some("token"), Some(false)));
    // The token cannot be combined with named users (decisions would have no person).
    let e = start_err(Some(token), AccessConfig { users: Some(users()), ..Default::default() });
    assert!(e.contains("cannot be combined"), "{e}");
}

fn start_err(token: Option<&str>, access: AccessConfig) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn");
    common::write_checkpoint(&run, Modality::Mri);
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let panel = Panel::load(&[format!("cnn:{}", run.display())], None, &LlmOptions::default(), &meter).unwrap();
    let st = mica_report::Store::open(tmp.path().join("s.sqlite")).unwrap();
    let settings = Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: token.map(String::from) };
    App::new(panel, st, settings).and_then(|a| a.with_access(access)).err().expect("refused").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_is_believed_only_from_the_proxy() {
    let trusted = start(
        None,
        AccessConfig {
            users: Some(users()),
            proxy: Some(TrustedProxy { header: "x-remote-user".into(), peers: vec!["127.0.0.1".parse().unwrap()] }),
            ..Default::default()
        },
    )
    .await;
    let as_user = |name: &str| {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", name.parse().unwrap());
        h
    };
    let h: Value = trusted.get("/api/v1/health", as_user(VIEWER.0)).await.json().await.unwrap();
    assert_eq!((h["auth"]["user"].as_str(), h["auth"]["role"].as_str(), h["auth"]["auth_method"].as_str()), (Some(VIEWER.0), Some("viewer"), Some("proxy-header")));
    let r = trusted.get("/api/v1/health", as_user("Somebody Else")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a proxied name not in the users file");

    let untrusted = start(
        None,
        AccessConfig {
            proxy: Some(TrustedProxy { header: "x-remote-user".into(), peers: vec!["10.9.8.7".parse().unwrap()] }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(untrusted.get("/api/v1/health", as_user(PHYSICIAN.0)).await.status(), StatusCode::UNAUTHORIZED);
}
