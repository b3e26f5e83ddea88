//! Who is asking: named users with argon2id-hashed secrets (`--users users.toml`), a user name
//! set by a trusted reverse proxy (`--trusted-user-header`, only from `--trusted-proxy`
//! addresses), or the single shared token (`MICA_SERVE_TOKEN`). Browsers sign in once by POST and
//! then carry a session cookie; the session itself lives here, in memory, and expires.
//!
//! Roles: a `physician` records decisions; a `viewer` reads cases, runs and monitoring. With
//! named identities the decision records the signed-in user, never a name typed into a form.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Shortest secret `hash_secret` accepts for a new user.
pub const MIN_SECRET_CHARS: usize = 12;
/// Longest user name (it is stored with every decision).
pub const MAX_NAME_CHARS: usize = 120;
/// A session not used for this long is gone (a workstation left signed in).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(8 * 3600);
/// A session is gone after this long however much it is used (one shift).
pub const MAX_SESSION_AGE: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins for one name within [`FAILURE_WINDOW`] before it is refused for the rest of
/// the window: argon2 makes each guess slow, this makes guessing a secret online hopeless.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {message}")]
    UsersFile { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Physician,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Physician => "physician",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "physician" => Ok(Role::Physician),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!("unknown role `{other}`: physician or viewer")),
        }
    }
}

/// How the requester was identified (recorded with each decision, in the results store's
/// terms: [`AuthMethod::stored`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication configured (loopback or `--allow-open`).
    None,
    /// The shared bearer token: a role, but no person.
    Token,
    /// A named user's secret (`--users`).
    Password,
    /// A trusted reverse proxy's header.
    Proxy,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Token => "token",
            AuthMethod::Password => "users-file",
            AuthMethod::Proxy => "proxy-header",
        }
    }

    pub fn stored(self) -> mica_report::cases::AuthMethod {
        use mica_report::cases::AuthMethod as A;
        match self {
            AuthMethod::None => A::None,
            AuthMethod::Token => A::Token,
            AuthMethod::Password => A::UsersFile,
            AuthMethod::Proxy => A::ProxyHeader,
        }
    }
}

/// The identity a request carries through the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The person, when identity is on; `None` for the shared token and open servers.
    pub name: Option<String>,
    pub role: Role,
    pub method: AuthMethod,
}

impl Principal {
    pub fn open() -> Self {
        Principal { name: None, role: Role::Physician, method: AuthMethod::None }
    }
}

/// One `[[users]]` entry of `users.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub role: Role,
    /// An argon2id PHC string (`$argon2id$v=19$...`), as `mica users add` writes it.
    pub secret: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<UserEntry>,
}

/// The named users of `--users`.
#[derive(Debug, Clone)]
pub struct Users {
    by_name: BTreeMap<String, UserEntry>,
    /// Verified against when the name is unknown, so an unknown name costs the same time as a
    /// wrong secret (user names are not disclosed by timing).
    decoy: String,
}

pub fn valid_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS || name.trim() != name || name.chars().any(char::is_control) {
        return Err(format!(
            "user name `{}` must be 1 to {MAX_NAME_CHARS} characters, one line, no leading or trailing spaces",
            name.chars().filter(|c| !c.is_control()).take(40).collect::<String>()
        ));
    }
    Ok(())
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthError::UsersFile { path: path.display().to_string(), message: e.to_string() })?;
        Users::parse(&text).map_err(|m| AuthError::UsersFile { path: path.display().to_string(), message: m })
    }

    pub fn parse(text: &str) -> Result<Users, String> {
        let f: UsersFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if f.users.is_empty() {
            return Err("no [[users]] entry".into());
        }
        let mut by_name = BTreeMap::new();
        for u in f.users {
            valid_name(&u.name)?;
            let h = PasswordHash::new(&u.secret)
                .map_err(|e| format!("user `{}`: the secret is not an argon2id hash ({e}); create entries with `mica users add`", u.name))?;
            if h.algorithm.as_str() != "argon2id" {
                return Err(format!("user `{}`: the secret is hashed with {}, argon2id is required", u.name, h.algorithm));
            }
            if by_name.insert(u.name.clone(), u.clone()).is_some() {
                return Err(format!("user `{}` is listed twice", u.name));
            }
        }
        let decoy = hash_secret_unchecked(&rand_hex(16)).map_err(|e| e.to_string())?;
        Ok(Users { by_name, decoy })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.by_name.get(name).map(|u| u.role)
    }

    /// The user's role if `secret` is theirs. Slow on purpose (argon2): call it off the async
    /// threads.
    pub fn verify(&self, name: &str, secret: &str) -> Option<Role> {
        match self.by_name.get(name) {
            Some(u) => verify_secret(&u.secret, secret).then_some(u.role),
            None => {
                let _ = verify_secret(&self.decoy, secret);
                None
            }
        }
    }
}

fn verify_secret(phc: &str, secret: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| Argon2::default().verify_password(secret.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

fn hash_secret_unchecked(secret: &str) -> Result<String, AuthError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AuthError::Invalid(e.to_string()))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// The argon2id PHC string of a new user's secret (random salt, the argon2 crate's default
/// cost: 19 MiB, 2 passes).
pub fn hash_secret(secret: &str) -> Result<String, AuthError> {
    if secret.chars().count() < MIN_SECRET_CHARS {
        return Err(AuthError::Invalid(format!("the secret must have at least {MIN_SECRET_CHARS} characters")));
    }
    hash_secret_unchecked(secret)
}

/// `text` (a users file, possibly empty) with one more entry; refuses a name already there.
pub fn add_user(text: &str, name: &str, role: Role, secret: &str) -> Result<String, AuthError> {
    valid_name(name).map_err(AuthError::Invalid)?;
    let mut f: UsersFile = if text.trim().is_empty() {
        UsersFile::default()
    } else {
        toml::from_str(text).map_err(|e| AuthError::Invalid(e.to_string()))?
    };
    if f.users.iter().any(|u| u.name == name) {
        return Err(AuthError::Invalid(format!("user `{name}` already exists")));
    }
    f.users.push(UserEntry { name: name.to_string(), role, secret: hash_secret(secret)? });
    toml::to_string(&f).map_err(|e| AuthError::Invalid(e.to_string()))
}

/// A reverse proxy that authenticates users and names them in a header.
#[derive(Debug, Clone)]
pub struct TrustedProxy {
    /// Lower-case header name, e.g. `x-remote-user`.
    pub header: String,
    /// Only connections from these addresses may set the header.
    pub peers: Vec<IpAddr>,
}

fn rand_hex(n: usize) -> String {
    (0..n).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

struct Session {
    principal: Principal,
    created: Instant,
    last_seen: Instant,
}

/// Signed-in browsers. The cookie holds a random 256-bit id; the map is keyed by its SHA-256,
/// so a dump of this memory does not hand out live cookies.
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    pub idle: Duration,
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Sessions { map: Mutex::new(HashMap::new()), failures: Mutex::new(HashMap::new()), idle }
    }

    /// A new session for `p`; returns the cookie value (64 hex digits).
    pub fn create(&self, p: Principal) -> String {
        let id = rand_hex(32);
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, s| !expired(s, now, self.idle));
        m.insert(sha256_hex(&id), Session { principal: p, created: now, last_seen: now });
        id
    }

    /// The session's principal, renewing its idle timer; `None` when unknown or expired.
    pub fn get(&self, id: &str) -> Option<Principal> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let key = sha256_hex(id);
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&key) {
            Some(s) if !expired(s, now, self.idle) => {
                s.last_seen = now;
                Some(s.principal.clone())
            }
            Some(_) => {
                m.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&sha256_hex(id));
    }

    /// True while `name` has used up its failed attempts for the current window.
    pub fn locked_out(&self, name: &str) -> bool {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.get(name).is_some_and(|(n, t0)| *n >= MAX_FAILURES && t0.elapsed() < FAILURE_WINDOW)
    }

    pub fn record_failure(&self, name: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() > 10_000 {
            f.retain(|_, (_, t0)| t0.elapsed() < FAILURE_WINDOW);
        }
        let e = f.entry(name.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    pub fn clear_failures(&self, name: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
}

fn expired(s: &Session, now: Instant, idle: Duration) -> bool {
    now.duration_since(s.last_seen) >= idle || now.duration_since(s.created) >= MAX_SESSION_AGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_added_hashed_and_verified() {
        let text = add_user("", "Dr Ada", Role::Physician, "correct horse battery").unwrap();
        let text = add_user(&text, "Vic Viewer", Role::Viewer, "another long secret").unwrap();
        assert!(!text.contains("correct horse") && text.contains("$argon2id$"), "{text}");
        assert!(add_user(&text, "Dr Ada", Role::Viewer, "whatever secret 1").unwrap_err().to_string().contains("already exists"));
        assert!(hash_secret("short").is_err());
        let u = Users::parse(&text).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u.verify("Dr Ada", "correct horse battery"), Some(Role::Physician));
        assert_eq!(u.verify("Vic Viewer", "another long secret"), Some(Role::Viewer));
        assert_eq!(u.verify("Dr Ada", "correct horse batter"), None);
        assert_eq!(u.verify("Nobody", "correct horse battery"), None);
    }

    #[test]
    fn a_users_file_with_plain_or_weak_secrets_is_refused() {
        let plain = "[[users]]\nname = \"a\"\nrole = \"physician\"\nsecret = \"hunter2hunter2\"\n";
        assert!(Users::parse(plain).unwrap_err().contains("argon2id"));
        assert!(Users::parse("[[users]]\nname = \"a\"\nrole = \"admin\"\nsecret = \"x\"\n").is_err());
        assert!(Users::parse("").unwrap_err().contains("no [[users]]"));
        let h = hash_secret("a long enough secret").unwrap();
        let twice = format!("[[users]]\nname = \"a\"\nrole = \"viewer\"\nsecret = \"{h}\"\n[[users]]\nname = \"a\"\nrole = \"viewer\"\nsecret = \"{h}\"\n");
        assert!(Users::parse(&twice).unwrap_err().contains("twice"));
    }

    #[test]
    fn sessions_expire_and_can_be_removed() {
        let s = Sessions::new(Duration::from_secs(3600));
        let p = Principal { name: Some("a".into()), role: Role::Viewer, method: AuthMethod::Password };
        let id = s.create(p.clone());
        assert_eq!(id.len(), 64);
        assert_eq!(s.get(&id), Some(p.clone()));
        assert_eq!(s.get(&"0".repeat(64)), None);
        s.remove(&id);
        assert_eq!(s.get(&id), None);
        let gone = Sessions::new(Duration::ZERO);
        let id = gone.create(p);
        assert_eq!(gone.get(&id), None, "an idle limit of zero expires at once");
    }

    #[test]
    fn repeated_failures_lock_a_name_out() {
        let s = Sessions::new(DEFAULT_IDLE);
        for _ in 0..MAX_FAILURES {
            assert!(!s.locked_out("a"));
            s.record_failure("a");
        }
        assert!(s.locked_out("a"));
        assert!(!s.locked_out("b"));
        s.clear_failures("a");
        assert!(!s.locked_out("a"));
    }
}
