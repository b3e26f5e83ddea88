//! `mica serve`: the study's operating model, "the AI proposes, the physician decides", in front
//! of a person, and the same actions as a JSON API for a PACS or hospital system.
//!
//! Why it is shaped this way:
//! - Every classifier answers through the library calls the CLI uses ([`mica_cnn`],
//!   [`mica_llm`]); the server adds no model logic, so the page shows what `mica classify` would.
//! - Uploads are untrusted: their kind is decided by magic bytes, DICOM identifiers are removed
//!   before anything reads the header ([`mica_data::upload`]), the image itself is never stored
//!   (only the SHA-256 of its de-identified pixels), and no request names a file-system path
//!   (case ids are made here, run ids are looked up in the store).
//! - Decisions are an append-only audit trail in the same SQLite results store as the runs
//!   ([`mica_report::cases`]), so agreement with physicians can be monitored over time next to
//!   the benchmark results.
//! - The pages are plain HTML with a little JavaScript calling `/api/v1`: a person and a
//!   hospital system use the same routes, and nothing is fetched from outside (works offline).

pub mod app;
pub mod auth;
pub mod intake;
pub mod pages;
pub mod panel;
pub mod security;
pub mod signin;
pub mod tasks;
pub mod time;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use app::{route_table, router, App, RouteInfo, Settings, OPENAPI};
pub use intake::ServeOptions;
pub use panel::{LlmOptions, Panel};
pub use signin::AccessConfig;
pub use tasks::{load_tasks, read_tasks_file, Task, TaskSpec};

/// Errors that stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting or classifier that cannot work (exit code 2 in the CLI).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] mica_report::ReportError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// True for a folder that reads as a run: a comparison (manifest, or classifier folders with
/// `metrics.json`) or a single classifier's run (`metrics.json` at its root).
fn is_run_dir(d: &Path) -> bool {
    let root = mica_core::RunRoot::new(d);
    root.manifest().is_file()
        || root.flat().is_finished()
        || std::fs::read_dir(d)
            .map(|rd| rd.flatten().any(|e| mica_core::ClassifierDir::new(e.path()).is_finished()))
            .unwrap_or(false)
}

/// Indexes `dir` into the store if it is a finished run, else every finished run directly
/// under it, as `mica runs add` would, but without writing into the run directories. Returns
/// how many were indexed and a note for each run that could not be read.
pub fn index_runs_dir(store: &mut mica_report::Store, dir: &Path) -> Result<(usize, Vec<String>), ServerError> {
    if !dir.is_dir() {
        return Err(ServerError::Config(format!("{}: --runs-dir is not a folder", dir.display())));
    }
    let candidates: Vec<PathBuf> = if is_run_dir(dir) {
        vec![dir.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ServerError::Config(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && is_run_dir(p))
            .collect();
        v.sort();
        v
    };
    let mut indexed = 0;
    let mut notes = Vec::new();
    for c in candidates {
        match mica_report::RunDir::open(&c) {
            Ok(run) => {
                let cmp = mica_report::Comparison::build(&run);
                store.index(&run, &cmp)?;
                indexed += 1;
            }
            Err(e) => notes.push(format!("not indexed: {e}")),
        }
    }
    Ok((indexed, notes))
}

/// Serves `app` on `listener` until `shutdown` resolves.
///
/// Its own accept loop rather than `axum::serve`, for one reason: a client must send its
/// request headers within `ServeOptions::header_read_timeout` (hyper needs a timer for that,
/// which `axum::serve` does not give it), so slow-header connections cannot pile up. Each
/// request carries the peer address as `ConnectInfo<SocketAddr>` (what `--trusted-proxy` is
/// checked against), as `into_make_service_with_connect_info` would give it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let header_timeout = app.0.options.header_read_timeout;
    let router = router(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let svc = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(svc.clone(), req.map(axum::body::Body::new))
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Binds `addr`, tells `ready` the bound address (port 0 picks a free one), then serves on
/// its own runtime until Ctrl-C or SIGTERM.
pub fn run(app: App, addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    let rt = mica_llm::runtime().map_err(|e| ServerError::Serve(std::io::Error::other(e.to_string())))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        ready(listener.local_addr().map_err(ServerError::Serve)?);
        serve(listener, app, shutdown_signal()).await
    })
}

/// Resolves on Ctrl-C, or SIGTERM on Unix (the simulator's rule, shared).
pub use mica_llm::shutdown_signal;
