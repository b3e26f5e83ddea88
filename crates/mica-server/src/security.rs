//! Deployment defaults that keep a mica server from being reachable or drivable by accident:
//! an open server only on loopback unless the operator says otherwise, `Host` checked against
//! an allow-list (DNS rebinding), the origin of every state-changing request checked (a web page
//! the physician happens to visit cannot upload images or record decisions), and redirects after
//! sign-in that can only go to a path on this server.

use std::net::IpAddr;

use axum::http::{header, HeaderMap, Method};

/// The shortest accepted bearer token: shorter ones are guessable over the network.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Refuses a token that is empty or short (it would silently weaken or disable authentication).
pub fn check_token(token: &str) -> Result<(), String> {
    let n = token.trim().chars().count();
    if n == 0 {
        return Err("the bearer token (MICA_SERVE_TOKEN) is empty: set a random value of at least 16 characters, or unset the variable".into());
    }
    if n < MIN_TOKEN_CHARS {
        return Err(format!(
            "the bearer token (MICA_SERVE_TOKEN) has {n} characters: at least {MIN_TOKEN_CHARS} are required (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(())
}

/// An open server (no authentication) is only started on a loopback address unless
/// `allow_open` says the operator means it: anyone on the network could otherwise upload images
/// (spending LLM quota) and write into the audit trail.
pub fn check_exposure(bind: IpAddr, authenticated: bool, allow_open: bool) -> Result<(), String> {
    if authenticated || allow_open || bind.is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {bind} without authentication: anyone who can reach this address could upload images and record decisions. \
         Configure identities (--users FILE, or --trusted-user-header with --trusted-proxy), set MICA_SERVE_TOKEN, \
         bind to 127.0.0.1, or pass --allow-open if this network is trusted"
    ))
}

/// The `Host` values this server answers to. A DNS-rebinding page reaches the server under the
/// attacker's host name, so names are checked; an IP literal cannot be rebound (the browser's
/// origin is then the IP itself), so IP literals are accepted.
#[derive(Debug, Clone, Default)]
pub struct HostAllowList {
    names: Vec<String>,
}

impl HostAllowList {
    /// `localhost` plus `extra` (the operator's `--allowed-host` values, with or without port).
    pub fn new(extra: &[String]) -> Self {
        let mut names = vec!["localhost".to_string()];
        for e in extra {
            let h = host_only(e.trim()).to_ascii_lowercase();
            if !h.is_empty() && !names.contains(&h) {
                names.push(h);
            }
        }
        HostAllowList { names }
    }

    /// True when a request with this `Host` header may be served. A request without one (not a
    /// browser: HTTP/1.0 tools) has nothing to rebind and is allowed.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let h = host_only(host.trim()).trim_end_matches('.').to_ascii_lowercase();
        if h.parse::<IpAddr>().is_ok() {
            return true;
        }
        self.names.contains(&h)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The host part of a `host[:port]` or `[v6][:port]` authority.
fn host_only(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => authority,
    }
}

/// The authority (`host[:port]`) of an absolute URL such as an `Origin` or `Referer` value.
fn url_authority(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    // Credentials in a Referer are not an authority we compare.
    Some(auth.rsplit('@').next().unwrap_or(auth))
}

/// Why a state-changing request (POST, PUT, PATCH, DELETE) looks cross-origin, or `None` when
/// it comes from this server's own pages or from a client that is not a browser. Checked in
/// order: `Origin`, then `Sec-Fetch-Site`, then `Referer`; a request with none of them is not
/// from a browser (browsers send `Origin` on every such request). `Origin: null` is what a
/// browser sends for this server's own form posts under `Referrer-Policy: no-referrer`, and
/// also for sandboxed frames: it passes only with `Sec-Fetch-Site: same-origin`.
pub fn cross_origin(method: &Method, headers: &HeaderMap, host: Option<&str>) -> Option<String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE) {
        return None;
    }
    let text = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_string());
    let same_host = |auth: &str| host.is_some_and(|h| h.trim().eq_ignore_ascii_case(auth));
    let origin = text(header::ORIGIN);
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).map(str::trim);
    if origin.as_deref() == Some("null") {
        return match fetch_site {
            Some("same-origin") => None,
            _ => Some("the request comes from an opaque origin (Origin: null)".into()),
        };
    }
    if let Some(origin) = origin {
        return match url_authority(&origin) {
            Some(a) if same_host(a) => None,
            _ => Some("the request comes from another web site (Origin)".into()),
        };
    }
    if let Some(site) = fetch_site {
        return match site {
            "same-origin" | "none" => None,
            _ => Some("the request comes from another web site (Sec-Fetch-Site)".into()),
        };
    }
    if let Some(referer) = text(header::REFERER) {
        return match url_authority(&referer) {
            Some(a) if same_host(a) => None,
            _ => Some("the request comes from another web site (Referer)".into()),
        };
    }
    None
}

/// `next` if it is a path on this server, else `None`: one leading `/` (`//host` and `/\host`
/// are other hosts to a browser), no backslash, no control character or space, no scheme.
pub fn local_path(next: &str) -> Option<&str> {
    let b = next.as_bytes();
    let ok = next.len() <= 2048
        && b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/') | Some(b'\\'))
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c.is_whitespace());
    ok.then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn only_local_paths_are_redirect_targets() {
        for good in ["/", "/monitoring", "/cases/0123?x=1", "/runs/3#top", "/a://b"] {
            assert_eq!(local_path(good), Some(good), "{good}");
        }
        for bad in ["", "//evil.host/", "/\\evil", "\\\\evil", "https://evil.host/", "evil", "/ok\\..\\x", "/a b", "/a\nLocation: x", "javascript:alert(1)"] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hosts_are_names_from_the_list_or_ip_literals() {
        let l = HostAllowList::new(&["Mica.Hospital.example:8443".into()]);
        for ok in [None, Some("localhost:8080"), Some("LOCALHOST"), Some("127.0.0.1:8080"), Some("[::1]:80"), Some("10.1.2.3"), Some("mica.hospital.example"), Some("mica.hospital.example.:8443")] {
            assert!(l.allows(ok), "{ok:?}");
        }
        for bad in ["evil.example", "evil.example:8080", "localhost.evil.example", "mica.hospital.example.evil", ""] {
            assert!(!l.allows(Some(bad)), "{bad}");
        }
    }

    #[test]
    fn state_changing_requests_must_come_from_this_origin() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let host = Some("127.0.0.1:8080");
        assert!(cross_origin(&Method::GET, &h(&[("origin", "https://evil.example")]), host).is_none());
        assert!(cross_origin(&Method::POST, &h(&[]), host).is_none(), "not a browser");
        assert!(cross_origin(&Method::POST, &h(&[("origin", "http://127.0.0.1:8080")]), host).is_none());
        assert!(cross_origin(&Method::POST, &h(&[("origin", "http://evil.example")]), host).is_some());
        assert!(cross_origin(&Method::POST, &h(&[("origin", "null")]), host).is_some());
        assert!(cross_origin(&Method::POST, &h(&[("origin", "null"), ("sec-fetch-site", "cross-site")]), host).is_some());
        assert!(cross_origin(&Method::POST, &h(&[("origin", "null"), ("sec-fetch-site", "same-origin")]), host).is_none(), "a form post under no-referrer");
        assert!(cross_origin(&Method::POST, &h(&[("origin", "http://127.0.0.1:9999")]), host).is_some());
        assert!(cross_origin(&Method::DELETE, &h(&[("sec-fetch-site", "cross-site")]), host).is_some());
        assert!(cross_origin(&Method::POST, &h(&[("sec-fetch-site", "same-origin")]), host).is_none());
        assert!(cross_origin(&Method::PUT, &h(&[("referer", "http://evil.example/x")]), host).is_some());
        assert!(cross_origin(&Method::POST, &h(&[("referer", "http://127.0.0.1:8080/cases/1")]), host).is_none());
        assert!(cross_origin(&Method::POST, &h(&[("origin", "http://127.0.0.1:8080")]), None).is_some(), "no Host to match");
    }

    #[test]
    fn open_binds_beyond_loopback_need_a_decision() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        let lan: IpAddr = "192.168.1.20".parse().unwrap();
        assert!(check_exposure("127.0.0.1".parse().unwrap(), false, false).is_ok());
        assert!(check_exposure("::1".parse().unwrap(), false, false).is_ok());
        let e = check_exposure(any, false, false).unwrap_err();
        assert!(e.contains("--allow-open") && e.contains("--users"), "{e}");
        assert!(check_exposure(lan, false, false).is_err());
        assert!(check_exposure(lan, true, false).is_ok());
        assert!(check_exposure(any, false, true).is_ok());
    }

    #[test]
    fn empty_and_short_tokens_are_refused() {
        assert!(check_token("").unwrap_err().contains("empty"));
        assert!(check_token("   ").unwrap_err().contains("empty"));
        assert!(check_token("short-token-15c").unwrap_err().contains("at least 16"));
        assert!(check_token("a-token-of-16-ch").is_ok());
    }
}
