//! A model server on this machine (Ollama, vLLM, llama.cpp) whose energy belongs to the run:
//! finding its process from its listening port, and reading process and machine CPU time from
//! `/proc`.
//!
//! mica's own process time leaves such a server out, so the server is found the way `ss -lptn`
//! finds it: the LISTEN socket on the port in `/proc/net/tcp{,6}` gives an inode, and the
//! process holding `socket:[inode]` among its fds is the server. Its CPU time is that of its
//! whole process tree (Ollama runs models in `ollama runner` children, vLLM in worker
//! processes), read from `/proc/PID/stat`. Where the owner cannot be seen (another user's fds,
//! another pid namespace, a container's port forwarder) the caller falls back to the
//! machine-wide CPU time of `/proc/stat`, labelled as such.
//!
//! Every path is under an injectable proc root, so tests run on a fake tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::EnergyError;

/// A model server on this machine, known by the TCP port it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalServer {
    pub port: u16,
}

impl LocalServer {
    /// The server behind `base_url` when that URL points at this machine (`localhost`,
    /// `127.x.x.x`, `::1`, `0.0.0.0`), with the scheme's default port when none is given;
    /// `None` for any other host. Lets a caller turn an LLM endpoint into a measurement request.
    pub fn from_base_url(base_url: &str) -> Option<LocalServer> {
        let (scheme, rest) = base_url.trim().split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next()?;
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        let host = host.to_ascii_lowercase();
        let local = host == "localhost"
            || host.ends_with(".localhost")
            || host == "::1"
            || host == "0.0.0.0"
            || host.starts_with("127.");
        if !local {
            return None;
        }
        let port = match port {
            Some(p) => p.parse().ok()?,
            None => match scheme.to_ascii_lowercase().as_str() {
                "http" => 80,
                "https" => 443,
                _ => return None,
            },
        };
        Some(LocalServer { port })
    }
}

/// Processes that hold a forwarded port for a server running elsewhere (a container): the
/// holder is not the server, so its CPU time would say nothing.
const PORT_FORWARDERS: &[&str] = &["docker-proxy", "rootlesskit", "slirp4netns", "pasta"];

/// Inodes of the LISTEN (state `0A`) sockets on `port` in `net/tcp` and `net/tcp6`. The error
/// is the reason in words when neither file can be read.
pub fn listening_inodes(proc_root: &Path, port: u16) -> Result<Vec<u64>, String> {
    let mut inodes = Vec::new();
    let mut errors = Vec::new();
    for file in ["net/tcp", "net/tcp6"] {
        let path = proc_root.join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => inodes.extend(parse_listeners(&text, port)),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if errors.len() == 2 {
        return Err(errors.join("; "));
    }
    inodes.sort_unstable();
    inodes.dedup();
    Ok(inodes)
}

/// The LISTEN socket inodes on `port` in one `/proc/net/tcp`-format table.
fn parse_listeners(text: &str, port: u16) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (p == port && *f.get(3)? == "0A" && inode != 0).then_some(inode)
        })
        .collect()
}

fn numeric_dirs(proc_root: &Path) -> Result<Vec<u32>, String> {
    let entries =
        std::fs::read_dir(proc_root).map_err(|e| format!("{}: {e}", proc_root.display()))?;
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// One line of `/proc/PID/stat`, the fields mica needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcStat {
    pub ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks. The children's part keeps the sum
    /// continuous when a child of the tree exits and is reaped.
    pub ticks: u64,
    pub rss_pages: u64,
}

pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    // comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field n is f[n - 3].
    let n = |field: usize| -> Option<u64> { f.get(field - 3)?.parse().ok() };
    Some(ProcStat {
        ppid: n(4)? as u32,
        ticks: n(14)? + n(15)? + n(16)? + n(17)?,
        rss_pages: n(24)?,
    })
}

fn read_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?)
}

fn comm(proc_root: &Path, pid: u32) -> String {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where a local server was found, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLookup {
    /// The processes holding the listening socket that are not children of another holder
    /// (pre-fork servers share the socket with their workers), with their `comm` names.
    Found { pids: Vec<u32>, names: Vec<String> },
    /// The socket or its owner cannot be seen; the reason in words.
    NotFound(String),
}

/// Finds the process that listens on `port` (see the module documentation). Scans every
/// process's fds once, so it belongs at meter set-up, not in a window's read.
pub fn find_local_server(proc_root: &Path, port: u16) -> ServerLookup {
    let inodes = match listening_inodes(proc_root, port) {
        Ok(i) if i.is_empty() => {
            return ServerLookup::NotFound(format!(
                "no socket listens on port {port} in {}/net/tcp{{,6}} (server not running yet, or in another network namespace such as a container)",
                proc_root.display()
            ))
        }
        Ok(i) => i,
        Err(e) => return ServerLookup::NotFound(format!("cannot read the socket tables: {e}")),
    };
    let wanted: BTreeSet<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let pids = match numeric_dirs(proc_root) {
        Ok(p) => p,
        Err(e) => return ServerLookup::NotFound(format!("cannot list processes: {e}")),
    };
    let mut holders = Vec::new();
    let mut unreadable = 0usize;
    for pid in pids {
        let fd_dir = proc_root.join(pid.to_string()).join("fd");
        let Ok(fds) = std::fs::read_dir(&fd_dir) else {
            unreadable += 1;
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|t| wanted.contains(t.to_string_lossy().as_ref()))
        });
        if holds {
            holders.push(pid);
        }
    }
    if holders.is_empty() {
        return ServerLookup::NotFound(format!(
            "the socket listening on port {port} (inode {}) is held by no process mica can see{}",
            inodes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if unreadable > 0 {
                format!(" ({unreadable} processes' fds unreadable: another user's server, or run mica as that user or root)")
            } else {
                " (another pid namespace, e.g. a container)".to_string()
            }
        ));
    }
    let set: BTreeSet<u32> = holders.iter().copied().collect();
    let roots: Vec<u32> = holders
        .iter()
        .copied()
        .filter(|&p| read_stat(proc_root, p).is_none_or(|s| !set.contains(&s.ppid)))
        .collect();
    let names: Vec<String> = roots.iter().map(|&p| comm(proc_root, p)).collect();
    if let Some((pid, name)) = roots
        .iter()
        .zip(&names)
        .find(|(_, n)| PORT_FORWARDERS.contains(&n.as_str()))
    {
        return ServerLookup::NotFound(format!(
            "port {port} is forwarded by {name} (pid {pid}): the server runs in a container, whose processes mica cannot attribute"
        ));
    }
    ServerLookup::Found { pids: roots, names }
}

/// CPU time and resident memory of a set of process trees, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct TreeUsage {
    pub cpu_s: f64,
    pub rss_bytes: f64,
    pub processes: usize,
}

/// Sums the trees rooted at `roots` (children found by `ppid`, at read time, since servers
/// start workers when a model loads), leaving out `exclude` and its descendants (mica itself,
/// whose time is read by `getrusage`). An error only when no root can be read (the server
/// exited).
pub(crate) fn tree_usage(
    proc_root: &Path,
    roots: &[u32],
    exclude: u32,
) -> Result<TreeUsage, EnergyError> {
    let pids = numeric_dirs(proc_root).map_err(EnergyError::Read)?;
    let mut stats: BTreeMap<u32, ProcStat> = BTreeMap::new();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for pid in pids {
        if let Some(s) = read_stat(proc_root, pid) {
            children.entry(s.ppid).or_default().push(pid);
            stats.insert(pid, s);
        }
    }
    if !roots.iter().any(|r| stats.contains_key(r)) {
        return Err(EnergyError::Read(format!(
            "local server process {} no longer exists in {} (server restarted? its energy cannot be attributed)",
            roots
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            proc_root.display()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    let mut ticks = 0u64;
    let mut pages = 0u64;
    while let Some(pid) = stack.pop() {
        if pid == exclude || !seen.insert(pid) {
            continue;
        }
        if let Some(s) = stats.get(&pid) {
            ticks += s.ticks;
            pages += s.rss_pages;
        }
        stack.extend(children.get(&pid).into_iter().flatten().copied());
    }
    Ok(TreeUsage {
        cpu_s: ticks as f64 / clock_ticks_per_s(),
        rss_bytes: pages as f64 * page_size(),
        processes: seen.len(),
    })
}

/// Whether `pid` is one of `roots` or descends from one (walking `ppid` up, at most 64 steps).
pub(crate) fn in_trees(proc_root: &Path, pid: u32, roots: &[u32]) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        if roots.contains(&p) {
            return true;
        }
        match read_stat(proc_root, p) {
            Some(s) if s.ppid != 0 && s.ppid != p => p = s.ppid,
            _ => return false,
        }
    }
    false
}

/// Non-idle CPU seconds of the whole machine since boot, from the `cpu` line of `stat`: user,
/// nice, system, irq and softirq. Idle and iowait are idle; steal is time another guest ran;
/// guest time is already inside user and nice.
pub(crate) fn machine_cpu_seconds(proc_root: &Path) -> Result<f64, EnergyError> {
    let path = proc_root.join("stat");
    let text = std::fs::read_to_string(&path).map_err(|e| EnergyError::io(&path, e))?;
    let bad = || EnergyError::Format {
        path: path.clone(),
        message: "no aggregate `cpu` line".into(),
    };
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or_else(bad)?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if v.len() < 7 {
        return Err(bad());
    }
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    Ok(busy as f64 / clock_ticks_per_s())
}

/// `MemTotal` of `meminfo`, in bytes: CodeCarbon's machine-mode RAM size.
pub(crate) fn machine_memory_bytes(proc_root: &Path) -> Result<f64, EnergyError> {
    let path = proc_root.join("meminfo");
    let text = std::fs::read_to_string(&path).map_err(|e| EnergyError::io(&path, e))?;
    text.lines()
        .find_map(|l| {
            let kb = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
            kb.trim().parse::<f64>().ok()
        })
        .map(|kb| kb * 1024.0)
        .ok_or_else(|| EnergyError::Format {
            path,
            message: "no MemTotal line".into(),
        })
}

pub(crate) fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub(crate) fn page_size() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    p.max(4096) as f64
}

/// The default proc root.
pub fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// A fake `/proc` tree.
    pub(crate) struct FakeProc {
        pub dir: tempfile::TempDir,
    }

    impl FakeProc {
        pub fn new() -> FakeProc {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("net")).unwrap();
            FakeProc { dir }
        }

        pub fn root(&self) -> &Path {
            self.dir.path()
        }

        /// A LISTEN socket (IPv4 table) on `port` with `inode`, plus an unrelated connection.
        pub fn listen(&self, port: u16, inode: u64) {
            let text = format!(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:{port:04X} 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 {} 1 0000000000000000 20 4 30 10 -1\n",
                inode + 1
            );
            fs::write(self.root().join("net/tcp"), text).unwrap();
            fs::write(
                self.root().join("net/tcp6"),
                "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n",
            )
            .unwrap();
        }

        /// A process with `stat` fields and fds pointing at `sockets`.
        pub fn process(
            &self,
            pid: u32,
            ppid: u32,
            comm: &str,
            ticks: (u64, u64),
            rss: u64,
            sockets: &[u64],
        ) {
            let d = self.root().join(pid.to_string());
            fs::create_dir_all(d.join("fd")).unwrap();
            self.set_ticks(pid, ppid, comm, ticks, rss);
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            for (i, s) in sockets.iter().enumerate() {
                std::os::unix::fs::symlink(
                    format!("socket:[{s}]"),
                    d.join("fd").join((i + 3).to_string()),
                )
                .unwrap();
            }
            std::os::unix::fs::symlink("/dev/null", d.join("fd/0")).unwrap();
        }

        /// Rewrites a process's `stat` with new CPU ticks (utime, stime).
        pub fn set_ticks(
            &self,
            pid: u32,
            ppid: u32,
            comm: &str,
            (utime, stime): (u64, u64),
            rss: u64,
        ) {
            let stat = format!(
                "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 4 0 1000 123456789 {rss} 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"
            );
            fs::write(self.root().join(pid.to_string()).join("stat"), stat).unwrap();
        }

        pub fn machine(&self, busy: u64, idle: u64, mem_kb: u64) {
            fs::write(
                self.root().join("stat"),
                format!("cpu  {busy} 0 0 {idle} 7 0 0 9 0 0\ncpu0 {busy} 0 0 {idle} 7 0 0 9 0 0\nintr 1\n"),
            )
            .unwrap();
            fs::write(
                self.root().join("meminfo"),
                format!("MemTotal:       {mem_kb} kB\nMemFree:         1000 kB\n"),
            )
            .unwrap();
        }
    }

    #[test]
    fn parses_socket_tables_and_stat_lines() {
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:2CA2 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 998877 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_listeners(tcp6, 11426), [998877]);
        assert!(parse_listeners(tcp6, 11434).is_empty());
        let s = parse_stat(
            "42 (my (odd) server) S 7 42 42 0 -1 0 0 0 0 0 150 50 3 2 20 0 1 0 0 0 99 0",
        )
        .unwrap();
        assert_eq!(
            s,
            ProcStat {
                ppid: 7,
                ticks: 205,
                rss_pages: 99
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn finds_the_server_tree_in_a_fake_proc() {
        let p = FakeProc::new();
        p.listen(11434, 5555);
        p.process(1, 0, "init", (10, 10), 10, &[]);
        p.process(300, 1, "ollama", (100, 20), 1000, &[5555]);
        p.process(301, 300, "ollama", (4000, 100), 50_000, &[]);
        p.process(302, 301, "ollama", (1, 1), 10, &[]);
        p.process(400, 1, "bash", (7, 7), 10, &[5556]);
        assert_eq!(
            find_local_server(p.root(), 11434),
            ServerLookup::Found {
                pids: vec![300],
                names: vec!["ollama".into()]
            }
        );
        let u = tree_usage(p.root(), &[300], 0).unwrap();
        assert_eq!(u.processes, 3);
        assert_eq!(u.cpu_s, 4222.0 / clock_ticks_per_s());
        assert_eq!(u.rss_bytes, 51_010.0 * page_size());
        // Leaving out one branch (mica inside the tree) drops its descendants too.
        assert_eq!(tree_usage(p.root(), &[300], 301).unwrap().processes, 1);
        assert!(in_trees(p.root(), 302, &[300]));
        assert!(!in_trees(p.root(), 400, &[300]));
        match find_local_server(p.root(), 8000) {
            ServerLookup::NotFound(why) => {
                assert!(why.contains("no socket listens on port 8000"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let err = tree_usage(p.root(), &[999], 0).unwrap_err().to_string();
        assert!(err.contains("no longer exists"), "{err}");
    }

    #[test]
    fn prefork_workers_share_the_socket_and_the_parent_is_the_root() {
        let p = FakeProc::new();
        p.listen(8000, 77);
        p.process(500, 1, "vllm", (1, 1), 1, &[77]);
        p.process(501, 500, "vllm", (1, 1), 1, &[77]);
        assert_eq!(
            find_local_server(p.root(), 8000),
            ServerLookup::Found {
                pids: vec![500],
                names: vec!["vllm".into()]
            }
        );
    }

    #[test]
    fn an_unseen_owner_or_a_port_forwarder_is_not_found() {
        let p = FakeProc::new();
        p.listen(11434, 5555);
        p.process(300, 1, "bash", (1, 1), 1, &[]);
        match find_local_server(p.root(), 11434) {
            ServerLookup::NotFound(why) => assert!(why.contains("held by no process"), "{why}"),
            other => panic!("{other:?}"),
        }
        p.process(301, 1, "docker-proxy", (1, 1), 1, &[5555]);
        match find_local_server(p.root(), 11434) {
            ServerLookup::NotFound(why) => assert!(why.contains("docker-proxy"), "{why}"),
            other => panic!("{other:?}"),
        }
        let empty = tempfile::tempdir().unwrap();
        match find_local_server(&empty.path().join("absent"), 11434) {
            ServerLookup::NotFound(why) => {
                assert!(why.contains("cannot read the socket tables"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn machine_wide_cpu_and_memory() {
        let p = FakeProc::new();
        p.machine(500, 10_000, 16 * 1024 * 1024);
        // user 500 only: idle, iowait (7) and steal (9) are not busy.
        assert_eq!(
            machine_cpu_seconds(p.root()).unwrap(),
            500.0 / clock_ticks_per_s()
        );
        assert_eq!(
            machine_memory_bytes(p.root()).unwrap(),
            16.0 * 1024.0 * 1024.0 * 1024.0
        );
        assert!(machine_cpu_seconds(&p.root().join("absent")).is_err());
    }

    #[test]
    fn finds_a_real_listener_in_this_process() {
        if !Path::new("/proc/net/tcp").exists() {
            eprintln!("SKIPPED: no /proc/net/tcp (not Linux)");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        match find_local_server(Path::new("/proc"), port) {
            ServerLookup::Found { pids, .. } => assert_eq!(pids, [std::process::id()]),
            other => panic!("{other:?}"),
        }
        assert!(machine_cpu_seconds(Path::new("/proc")).unwrap() > 0.0);
    }

    #[test]
    fn base_urls_on_this_machine() {
        let f = LocalServer::from_base_url;
        assert_eq!(
            f("http://localhost:11434/v1"),
            Some(LocalServer { port: 11434 })
        );
        assert_eq!(f("http://127.0.0.1:8000"), Some(LocalServer { port: 8000 }));
        assert_eq!(
            f("http://[::1]:8080/v1/chat"),
            Some(LocalServer { port: 8080 })
        );
        assert_eq!(
            f("http://user:pw@localhost/v1"),
            Some(LocalServer { port: 80 })
        );
        assert_eq!(f("https://LOCALHOST"), Some(LocalServer { port: 443 }));
        assert_eq!(f("https://api.openai.com/v1"), None);
        assert_eq!(f("http://192.168.1.5:11434"), None);
        assert_eq!(f("localhost:11434"), None);
    }
}
