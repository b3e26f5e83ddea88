//! Small helpers: CSV line splitting, run ids, host facts.

/// Splits one CSV line into fields, honouring double quotes (RFC 4180, no embedded newlines).
pub(crate) fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut field)),
            (_, c) => field.push(c),
        }
    }
    out.push(field);
    out
}

/// A random UUID v4 for the CSV `run_id` column.
pub(crate) fn run_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `uuid.NAMESPACE_URL` (RFC 4122 appendix C).
const NAMESPACE_URL: [u8; 16] = [
    0x6b, 0xa7, 0xb8, 0x11, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8,
];

/// CodeCarbon's `experiment_id` for a project: the UUID v5 (SHA-1, RFC 4122) of
/// `mica:<name>` in the URL namespace, i.e. Python's
/// `uuid.uuid5(uuid.NAMESPACE_URL, "mica:" + name)`. Stable, so every row of one project (or
/// experiment) carries the same id without any registry.
pub fn experiment_uuid(name: &str) -> String {
    let mut data = NAMESPACE_URL.to_vec();
    data.extend_from_slice(format!("mica:{name}").as_bytes());
    let h = sha1(&data);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b).to_string()
}

/// SHA-1 (FIPS 180-4), only for UUID v5 names: no SHA-1 crate is among the workspace's
/// dependencies and `uuid`'s `v5` feature would pull one in for these 20 bytes.
pub(crate) fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// The OS like Python's `platform.platform()` starts it (`Linux-6.8.0-45-generic-x86_64`),
/// from `uname`; `linux-x86_64` where uname fails.
pub(crate) fn os_platform() -> String {
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH);
    }
    let field = |f: &[libc::c_char]| -> String {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!(
        "{}-{}-{}",
        field(&u.sysname),
        field(&u.release),
        field(&u.machine)
    )
}

/// Seconds since the epoch of a `YYYY-MM-DDTHH:MM:SSZ` timestamp (what `iso_utc` writes).
pub(crate) fn parse_iso_utc(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let mut t = time.splitn(3, ':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Facts from `/proc/cpuinfo` and `/proc/meminfo` that the estimate and the CSV need.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostInfo {
    pub cpu_model: Option<String>,
    pub sockets: usize,
    pub hypervisor: bool,
    pub mem_total_gb: Option<f64>,
}

pub(crate) fn host_info() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut info = parse_cpuinfo(&cpuinfo);
    info.mem_total_gb =
        mica_core::machine::mem_total_bytes().map(|b| b as f64 / (1024.0 * 1024.0 * 1024.0));
    info
}

pub(crate) fn parse_cpuinfo(text: &str) -> HostInfo {
    let mut ids = std::collections::BTreeSet::new();
    let mut hypervisor = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "physical id" => {
                ids.insert(v.to_string());
            }
            "flags" if v.split_whitespace().any(|f| f == "hypervisor") => hypervisor = true,
            _ => {}
        }
    }
    HostInfo {
        cpu_model: mica_core::machine::cpu_model_in(text),
        sockets: ids.len().max(1),
        hypervisor,
        mem_total_gb: None,
    }
}

/// Logical CPUs online, as `psutil.cpu_count()` (which CodeCarbon divides by) reports them.
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_split_handles_quotes_and_commas() {
        assert_eq!(
            split_csv_line(r#""Intel EP80579 Integrated, 1066 MHz",18.0"#),
            ["Intel EP80579 Integrated, 1066 MHz", "18.0"]
        );
        assert_eq!(
            split_csv_line(r#"a,"b ""c""",,d"#),
            ["a", r#"b "c""#, "", "d"]
        );
    }

    #[test]
    fn run_ids_differ_and_look_like_uuids() {
        let (a, b) = (run_id(), run_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn sha1_and_uuid5_match_the_references() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        // Two blocks (56..64 bytes of padding boundary).
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // Python: uuid.uuid5(uuid.NAMESPACE_URL, "mica:brain-mri")
        assert_eq!(
            experiment_uuid("brain-mri"),
            "1eb97a28-4d86-529f-95e5-8385be6aa1fa"
        );
    }

    #[test]
    fn iso_timestamps_round_trip() {
        use std::time::{Duration, UNIX_EPOCH};
        for secs in [0u64, 86_400, 951_782_400, 1_709_251_199, 4_102_444_800] {
            let s = mica_core::time::iso_utc(UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(parse_iso_utc(&s), Some(secs as i64), "{s}");
        }
        assert_eq!(parse_iso_utc("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_iso_utc("2024-01-01 00:00:00"), None);
        assert!(os_platform().contains(std::env::consts::ARCH));
    }

    #[test]
    fn cpuinfo_parsing() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\nphysical id\t: 0\nflags\t\t: fpu hypervisor avx2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nphysical id\t: 0\n";
        let h = parse_cpuinfo(text);
        assert_eq!(h.cpu_model.as_deref(), Some("AMD EPYC"));
        assert_eq!(h.sockets, 1);
        assert!(h.hypervisor);
        let two = "model name: X\nphysical id: 0\nphysical id: 1\n";
        assert_eq!(parse_cpuinfo(two).sockets, 2);
    }
}
