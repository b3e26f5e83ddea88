//! The HTTP side of [`crate::auth`] and [`crate::security`]: the middleware every request
//! passes (Host allow-list, same-origin check on state-changing requests, identity, role), and
//! sign-in / sign-out.
//!
//! Order matters: the Host and origin checks come before identity, so a rebound or cross-site
//! request is refused even when the browser carries a valid session cookie.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::app::{ApiError, App};
use crate::auth::{self, AuthMethod, Principal, Role, TrustedProxy, Users};
use crate::pages;
use crate::security::{self, HostAllowList};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "mica_session";
/// Largest sign-in body read (a name, a secret and a path).
const MAX_SIGN_IN_BODY: usize = 8 * 1024;

/// How the server identifies people; set with [`App::with_access`].
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Named users (`--users`).
    pub users: Option<Users>,
    /// A reverse proxy that names the user in a header (`--trusted-user-header`,
    /// `--trusted-proxy`). With `users` too, a proxied name must be listed there and gets its
    /// role; without, every proxied user is a physician.
    pub proxy: Option<TrustedProxy>,
    /// Host names the server answers to besides `localhost` and IP literals (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    /// Mark the session cookie `Secure` (`--behind-tls`: a TLS-terminating proxy in front).
    pub secure_cookies: bool,
    /// Idle lifetime of a session ([`auth::DEFAULT_IDLE`] when `None`).
    pub session_idle: Option<Duration>,
}

/// The checks built from [`AccessConfig`] and the token, shared by every request.
pub(crate) struct Guard {
    pub(crate) config: AccessConfig,
    pub(crate) hosts: HostAllowList,
    pub(crate) sessions: auth::Sessions,
    pub(crate) token: Option<String>,
}

impl Guard {
    pub(crate) fn new(config: AccessConfig, token: Option<String>) -> Result<Guard, String> {
        if token.is_some() && (config.users.is_some() || config.proxy.is_some()) {
            return Err("MICA_SERVE_TOKEN cannot be combined with --users or --trusted-user-header: the shared token names no person, so decisions would have no identity. Unset the variable".into());
        }
        if let Some(p) = &config.proxy {
            if p.peers.is_empty() {
                return Err("--trusted-user-header needs --trusted-proxy ADDRESS: the header is only believed from the proxy's address".into());
            }
            if p.header.is_empty() || header::HeaderName::from_bytes(p.header.as_bytes()).is_err() {
                return Err(format!("--trusted-user-header `{}` is not a header name", p.header));
            }
        }
        let hosts = HostAllowList::new(&config.allowed_hosts);
        let sessions = auth::Sessions::new(config.session_idle.unwrap_or(auth::DEFAULT_IDLE));
        Ok(Guard { config, hosts, sessions, token })
    }

    /// Any form of authentication is configured.
    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some() || self.config.users.is_some() || self.config.proxy.is_some()
    }

    /// Names are attached to decisions (users or proxy).
    pub(crate) fn identity(&self) -> bool {
        self.config.users.is_some() || self.config.proxy.is_some()
    }

    pub(crate) fn mode(&self) -> &'static str {
        match (&self.token, &self.config.users, &self.config.proxy) {
            (Some(_), _, _) => "token",
            (None, Some(_), Some(_)) => "users+proxy",
            (None, Some(_), None) => "users",
            (None, None, Some(_)) => "proxy",
            (None, None, None) => "open",
        }
    }

    fn cookie(&self, id: &str, max_age: u64) -> String {
        format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
            if self.config.secure_cookies { "; Secure" } else { "" }
        )
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Equal-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The identity of a request, or why it has none.
fn identify(g: &Guard, req: &Request) -> Result<Option<Principal>, ApiError> {
    if !g.enabled() {
        return Ok(Some(Principal::open()));
    }
    let headers = req.headers();
    if let Some(p) = &g.config.proxy {
        if let Some(v) = headers.get(p.header.as_str()) {
            let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
            if peer.is_some_and(|ip| p.peers.contains(&ip)) {
                let name = v.to_str().map(str::trim).unwrap_or("");
                auth::valid_name(name).map_err(|m| ApiError::new(StatusCode::FORBIDDEN, "bad_proxy_user", m))?;
                let role = match &g.config.users {
                    Some(u) => u.role_of(name).ok_or_else(|| {
                        ApiError::new(StatusCode::FORBIDDEN, "unknown_user", format!("`{name}` is not in this server's users file"))
                    })?,
                    None => Role::Physician,
                };
                return Ok(Some(Principal { name: Some(name.to_string()), role, method: AuthMethod::Proxy }));
            }
            tracing::warn!("{} header from an untrusted address ignored", p.header);
        }
    }
    if let Some(id) = cookie_value(headers, SESSION_COOKIE) {
        if let Some(p) = g.sessions.get(&id) {
            return Ok(Some(p));
        }
    }
    if let Some(token) = &g.token {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()));
        if bearer {
            return Ok(Some(Principal { name: None, role: Role::Physician, method: AuthMethod::Token }));
        }
    }
    Ok(None)
}

/// The middleware: Host, origin, identity, role. The identity goes into the request's
/// extensions as a [`Principal`] for the handlers.
pub(crate) async fn guard(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let g = &app.0.guard;
    let host = match req.headers().get(header::HOST) {
        Some(v) => Some(v.to_str().unwrap_or("\u{fffd}").to_string()),
        None => req.uri().authority().map(|a| a.to_string()),
    };
    if !g.hosts.allows(host.as_deref()) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "host_not_allowed",
            "this server does not answer to that host name (an address it was not configured for; the operator can add it with --allowed-host)",
        )
        .into_response();
    }
    if let Some(why) = security::cross_origin(req.method(), req.headers(), host.as_deref()) {
        tracing::warn!("{} {} refused: {why}", req.method(), req.uri().path());
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!("{why}: state-changing requests are only accepted from this server's own pages"),
        )
        .into_response();
    }
    let path = req.uri().path();
    if path == "/sign-in" || path == "/sign-out" {
        return next.run(req).await;
    }
    let is_api = path.starts_with("/api/");
    match identify(g, &req) {
        Err(e) => e.into_response(),
        Ok(Some(p)) => {
            if p.role == Role::Viewer && !is_safe(req.method()) {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "your role is viewer: viewers can read cases, runs and monitoring; only physicians upload images and record decisions",
                )
                .into_response();
            }
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Ok(None) if !is_api && req.method() == Method::GET => {
            let next_path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            sign_in_page_for(g, next_path, None, StatusCode::UNAUTHORIZED)
        }
        Ok(None) => {
            let (msg, bearer) = match g.mode() {
                "token" => ("this server requires a bearer token: send `Authorization: Bearer <token>` (the token is in the server's MICA_SERVE_TOKEN)", true),
                "proxy" => ("sign in through the hospital's proxy in front of this server", false),
                _ => ("sign in first: POST /sign-in with {\"name\", \"secret\"} (JSON or a form); the answer sets a session cookie", false),
            };
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg).into_response();
            if bearer {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

fn sign_in_page_for(g: &Guard, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let next = security::local_path(next).unwrap_or("/");
    let kind = if g.config.users.is_some() {
        pages::SignInKind::Users
    } else if g.token.is_some() {
        pages::SignInKind::Token
    } else {
        pages::SignInKind::None
    };
    (status, pages::sign_in_page(kind, next, error)).into_response()
}

/// `GET /sign-in?next=/path`: the form. A GET never signs anyone in.
pub(crate) async fn sign_in_form(State(app): State<App>, req: Request) -> Response {
    let next = query_param(req.uri().query(), "next").unwrap_or_else(|| "/".into());
    sign_in_page_for(&app.0.guard, &next, None, StatusCode::OK)
}

#[derive(Deserialize, Default)]
struct SignIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

fn wants_json(headers: &HeaderMap) -> bool {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    ct.starts_with("application/json") || (accept.contains("application/json") && !accept.contains("text/html"))
}

/// `POST /sign-in`: a form (`name`, `secret` or `token`, `next`) or JSON with the same fields.
/// A form is answered with a redirect to `next` (a local path only); JSON with the identity.
pub(crate) async fn sign_in(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let g = &app.0.guard;
    let json_in = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let answer_json = wants_json(&headers);
    let fail = |status: StatusCode, code: &'static str, msg: &str, next: &str| -> Response {
        if answer_json {
            ApiError::new(status, code, msg).into_response()
        } else {
            sign_in_page_for(g, next, Some(msg), status)
        }
    };
    if body.len() > MAX_SIGN_IN_BODY {
        return fail(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "the sign-in request is too large", "/");
    }
    let form: SignIn = if json_in {
        match serde_json::from_slice(&body) {
            Ok(f) => f,
            Err(e) => return ApiError::new(StatusCode::BAD_REQUEST, "bad_sign_in", format!("expected JSON {{\"name\", \"secret\"}} or {{\"token\"}}: {e}")).into_response(),
        }
    } else {
        let text = String::from_utf8_lossy(&body);
        SignIn {
            name: query_param(Some(&text), "name"),
            secret: query_param(Some(&text), "secret"),
            token: query_param(Some(&text), "token"),
            next: query_param(Some(&text), "next"),
        }
    };
    let next = form.next.as_deref().and_then(security::local_path).unwrap_or("/").to_string();
    let principal = if let Some(users) = g.config.users.clone() {
        let name = form.name.unwrap_or_default().trim().to_string();
        let secret = form.secret.unwrap_or_default();
        if name.is_empty() || secret.is_empty() {
            return fail(StatusCode::UNAUTHORIZED, "bad_credentials", "enter your user name and secret", &next);
        }
        if g.sessions.locked_out(&name) {
            return fail(
                StatusCode::TOO_MANY_REQUESTS,
                "locked_out",
                "too many failed sign-ins for this name: wait 15 minutes or ask the administrator",
                &next,
            );
        }
        let n = name.clone();
        let verified = tokio::task::spawn_blocking(move || users.verify(&n, &secret)).await.ok().flatten();
        match verified {
            Some(role) => {
                g.sessions.clear_failures(&name);
                Principal { name: Some(name), role, method: AuthMethod::Password }
            }
            None => {
                g.sessions.record_failure(&name);
                tracing::warn!("failed sign-in");
                return fail(StatusCode::UNAUTHORIZED, "bad_credentials", "unknown user name or wrong secret", &next);
            }
        }
    } else if let Some(token) = &g.token {
        let given = form.token.or(form.secret).unwrap_or_default();
        if !same(given.trim().as_bytes(), token.as_bytes()) {
            tracing::warn!("failed sign-in");
            return fail(StatusCode::UNAUTHORIZED, "bad_credentials", "wrong access token", &next);
        }
        Principal { name: None, role: Role::Physician, method: AuthMethod::Token }
    } else {
        return fail(
            StatusCode::NOT_FOUND,
            "no_sign_in",
            if g.config.proxy.is_some() { "this server takes identities from the proxy in front of it: there is nothing to sign in to" } else { "this server has no authentication: there is nothing to sign in to" },
            &next,
        );
    };
    tracing::info!("signed in: {} ({})", principal.name.as_deref().unwrap_or("token"), principal.role.as_str());
    let body = json!({"user": principal.name, "role": principal.role.as_str(), "auth_method": principal.method.as_str()});
    let id = g.sessions.create(principal);
    let mut r = if answer_json { Json(body).into_response() } else { Redirect::to(&next).into_response() };
    if let Ok(v) = HeaderValue::from_str(&g.cookie(&id, auth::MAX_SESSION_AGE.as_secs())) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /sign-out`: ends the session and clears the cookie.
pub(crate) async fn sign_out(State(app): State<App>, headers: HeaderMap) -> Response {
    let g = &app.0.guard;
    if let Some(id) = cookie_value(&headers, SESSION_COOKIE) {
        g.sessions.remove(&id);
    }
    let mut r = if wants_json(&headers) {
        Json(json!({"signed_out": true})).into_response()
    } else {
        Redirect::to("/sign-in").into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&g.cookie("", 0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            out.push(b' ');
        } else if b[i] == b'%' && i + 2 < b.len() {
            match std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(percent_decode("%2F%2Fevil.host%2F"), "//evil.host/");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
