//! End-to-end tests of `mica llm-sim` and `mica classify --classifier llm:...` on a tiny
//! synthetic dataset, against the simulator on 127.0.0.1 (no network).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};

use assert_cmd::Command;
use predicates::prelude::PredicateBooleanExt;

const FAKE_KEY: &str = "sk-mica-cli-test-NEVER-WRITE-5e1d";

fn mica() -> Command {
    Command::cargo_bin("mica").unwrap()
}

fn synth(root: &Path) -> PathBuf {
    synth_n(root, 6)
}

fn synth_n(root: &Path, per_class: usize) -> PathBuf {
    mica()
        .args(["synth", "--modality", "mri", "--size", "32", "--per-class"])
        .arg(per_class.to_string())
        .arg("--out")
        .arg(root)
        .assert()
        .success();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

/// A running `mica llm-sim`; killed (by its own pid) when dropped.
struct Sim {
    child: Child,
    url: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim(dataset: &Path, extra: &[&str]) -> Sim {
    let bin = assert_cmd::cargo::cargo_bin("mica");
    let mut child = StdCommand::new(bin)
        .args(["llm-sim", "--port", "0", "--latency-ms", "1", "--dataset"])
        .arg(dataset)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    Sim { child, url }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn dry_run_against_the_simulator_then_cached_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let sim = start_sim(&ds, &["--accuracy", "0.8", "--prose-rate", "0.2"]);
    let out = tmp.path().join("run");
    let cache = tmp.path().join("cache");
    let classify = |extra: &[&str]| {
        let mut c = mica();
        c.env("OPENAI_API_KEY", FAKE_KEY)
            .args([
                "classify",
                "--split",
                "test",
                "--limit-per-class",
                "3",
                "--concurrency",
                "3",
            ])
            .arg("--dataset")
            .arg(&ds)
            .arg("--classifier")
            .arg(format!("llm:openai-compatible/sim-vlm@{}", sim.url))
            .arg("--out")
            .arg(&out)
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra);
        c
    };
    let first = classify(&[]).assert().success();
    let stdout = String::from_utf8_lossy(&first.get_output().stdout).to_string();
    assert!(stdout.contains("SIMULATED"), "{stdout}");
    assert!(stdout.contains("filter label_validation"), "{stdout}");
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let n = preds.lines().count();
    assert!(n > 0 && n <= 12, "{n}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["simulated"], true);
    assert_eq!(m["images"], n);
    let llm = &m["extra"]["llm"];
    assert_eq!(llm["simulated"], true);
    assert!(llm["filter_stages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["stage"] == "confidence"));
    assert!(llm["parse_stages"]["json"].as_u64().unwrap() > 0);
    assert!(llm["prompt_tokens"].as_u64().unwrap() > 0);
    // No price entry for a made-up model: cost unknown, never zero.
    assert!(llm["cost_usd"].is_null());

    // Same command again: everything is resumed from predictions.jsonl, nothing is asked.
    let again = classify(&[]).assert().success();
    let s = String::from_utf8_lossy(&again.get_output().stdout).to_string();
    assert!(s.contains(" 0 requests"), "{s}");
    assert_eq!(
        std::fs::read_to_string(out.join("predictions.jsonl")).unwrap(),
        preds
    );

    // A fresh run directory with the same settings: served from the cache, zero calls.
    let out2 = tmp.path().join("run2");
    let cached = mica()
        .env("OPENAI_API_KEY", FAKE_KEY)
        .args([
            "classify",
            "--split",
            "test",
            "--limit-per-class",
            "3",
            "--concurrency",
            "3",
        ])
        .arg("--dataset")
        .arg(&ds)
        .arg("--classifier")
        .arg(format!("llm:openai-compatible/sim-vlm@{}", sim.url))
        .arg("--out")
        .arg(&out2)
        .arg("--cache-dir")
        .arg(&cache)
        .assert()
        .success();
    let s = String::from_utf8_lossy(&cached.get_output().stdout).to_string();
    assert!(
        s.contains(" 0 requests") && s.contains(&format!("{n} cache hits")),
        "{s}"
    );

    // Other settings into the same run directory are refused.
    classify(&["--context", "image+findings"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("different settings"));

    // The API key is in no file written.
    let mut checked = 0;
    for dir in [&out, &out2, &cache] {
        for f in files_under(dir) {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string();
            assert!(
                !text.contains(FAKE_KEY),
                "{} contains the API key",
                f.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4);
}

#[test]
fn ollama_protocol_with_gpt4o_prices_and_findings() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let sim = start_sim(&ds, &["--accuracy", "1.0"]);
    let out = tmp.path().join("run");
    mica()
        .args([
            "classify",
            "--split",
            "test",
            "--limit-per-class",
            "2",
            "--no-cache",
            "--filter",
            "none",
        ])
        .args(["--context", "image+findings"])
        .arg("--dataset")
        .arg(&ds)
        .arg("--classifier")
        .arg(format!("llm:ollama/llama3.2-vision@{}", sim.url))
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["all"]["accuracy"], 1.0, "known images at accuracy 1.0");
    assert!(m["extra"]["llm"]["server_timings_ms"]["eval_ms"].is_number());
    assert_eq!(m["extra"]["llm"]["cost_usd"], 0.0);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("predictions.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(first["extra"]["findings"]
        .as_str()
        .unwrap()
        .contains("Texture"));

    // openai/gpt-4o pointed at the simulator: priced with GPT-4o's dated list price.
    let out = tmp.path().join("gpt");
    let ok = mica()
        .env("OPENAI_API_KEY", FAKE_KEY)
        .args([
            "classify",
            "--split",
            "test",
            "--limit-per-class",
            "1",
            "--no-cache",
        ])
        .arg("--dataset")
        .arg(&ds)
        .args(["--classifier", "llm:openai/gpt-4o", "--base-url", &sim.url])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let s = String::from_utf8_lossy(&ok.get_output().stdout).to_string();
    assert!(
        s.contains("openai/gpt-4o-2024-08-06 at $2.5/$10 per 1M in/out tokens, as of 2026-03"),
        "{s}"
    );
}

#[test]
fn bad_llm_settings_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let base = |classifier: &str| {
        let mut c = mica();
        c.args(["classify", "--dataset"])
            .arg(&ds)
            .args(["--classifier", classifier]);
        c.arg("--out").arg(tmp.path().join("o"));
        c
    };
    base("llm:openai-compatible/m@http://127.0.0.1:9")
        .args(["--context", "telepathy"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("unknown context mode"));
    base("llm:openai-compatible/m@http://127.0.0.1:9")
        .args(["--filter", "confidence=7"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("invalid filter spec"));
    base("llm:bard/x")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("unknown provider"));
    base("llm:openai/gpt-4o")
        .env_remove("OPENAI_API_KEY")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("OPENAI_API_KEY is not set"));
    base("llm:openai-compatible/m@http://127.0.0.1:9")
        .args(["--filter", "crosscheck=/nonexistent/p.jsonl"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("/nonexistent/p.jsonl"));
    mica()
        .args(["llm-sim", "--port", "0", "--accuracy", "1.5"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("accuracy"));
}

#[test]
fn unreachable_server_is_failed_after_retries_not_a_wrong_label() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    // Port 9 (discard) on localhost: connection refused at once.
    mica()
        .args([
            "classify",
            "--split",
            "test",
            "--limit-per-class",
            "1",
            "--no-cache",
            "--max-attempts",
            "2",
        ])
        .arg("--dataset")
        .arg(&ds)
        .args(["--classifier", "llm:openai-compatible/m@http://127.0.0.1:9"])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stdout(predicates::str::contains("4 failed"))
        .stderr(predicates::str::contains("every image failed"));
    for line in std::fs::read_to_string(out.join("predictions.jsonl"))
        .unwrap()
        .lines()
    {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(p["outcome"], "failed");
        assert!(p["predicted"].is_null());
        assert!(
            p["error"]
                .as_str()
                .unwrap()
                .contains("gave up after 2 attempts"),
            "{p}"
        );
    }
}

#[test]
fn a_refused_key_stops_the_run_with_exit_1_and_the_status() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let server = mica_run::testing::Server::start(|_| (401, mica_run::testing::INVALID_KEY.to_string()));
    let out = tmp.path().join("run");
    mica()
        .env("OPENAI_API_KEY", FAKE_KEY)
        .args(["classify", "--no-cache", "--dataset"])
        .arg(&ds)
        .arg("--classifier")
        .arg(format!("llm:openai-compatible/m@{}", server.url))
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("HTTP 401").and(predicates::str::contains("Incorrect API key")));
    assert!(server.requests() <= 4, "{} requests", server.requests());
    let log = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap_or_default();
    assert_eq!(log.lines().count(), 0, "nothing recorded: a rerun with the right key asks them all");
}

/// The parts of a prediction line that do not depend on timing.
fn untimed(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("latency_ms");
    if let Some(e) = o.get_mut("extra").and_then(|e| e.as_object_mut()) {
        e.remove("wall_ms");
        e.remove("server_timings");
    }
    v
}

#[test]
fn classify_and_compare_write_the_same_predictions_for_the_same_spec() {
    let tmp = tempfile::tempdir().unwrap();
    // 20 per class: 4 test images per class, of which --limit-per-class 2 draws two.
    let ds = synth_n(&tmp.path().join("data"), 20);
    let sim = start_sim(&ds, &["--accuracy", "0.7"]);
    for spec in ["baseline".to_string(), format!("llm:openai-compatible/sim-vlm@{}", sim.url)] {
        let a = tmp.path().join(format!("classify-{}", spec.len()));
        let b = tmp.path().join(format!("compare-{}", spec.len()));
        mica()
            .env("MICA_CACHE_DIR", tmp.path().join("cache-a"))
            .args(["classify", "--limit-per-class", "2", "--dataset"])
            .arg(&ds)
            .args(["--classifier", &spec, "--out"])
            .arg(&a)
            .assert()
            .success();
        mica()
            .env("MICA_CACHE_DIR", tmp.path().join("cache-b"))
            .args(["compare", "--no-report", "--no-store", "--limit-per-class", "2", "--dataset"])
            .arg(&ds)
            .args(["--classifier", &spec, "--out"])
            .arg(&b)
            .assert()
            .success();
        let one = std::fs::read_to_string(a.join("predictions.jsonl")).unwrap();
        let slug_dir = std::fs::read_dir(&b)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("predictions.jsonl").is_file())
            .unwrap();
        let two = std::fs::read_to_string(slug_dir.join("predictions.jsonl")).unwrap();
        let (one, two): (Vec<_>, Vec<_>) = (one.lines().map(untimed).collect(), two.lines().map(untimed).collect());
        assert_eq!(one.len(), 8, "two per class, the same seeded draw: {spec}");
        assert_eq!(one, two, "{spec}");
        assert_eq!(
            std::fs::read(a.join("split.csv")).unwrap(),
            std::fs::read(b.join("split.csv")).unwrap(),
            "the same split"
        );
    }
}

/// `mica llm check` against a stub that answers like OpenAI: (exit code, stdout, stderr).
fn llm_check(spec: &str, extra: &[&str]) -> (i32, String, String) {
    let out = mica()
        .env("OPENAI_API_KEY", FAKE_KEY)
        .args(["llm", "check", spec])
        .args(extra)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn llm_check_passes_a_working_server_and_states_the_cost_of_one_image() {
    let server = mica_run::testing::Server::start(|_| (200, mica_run::testing::completion("glioma")));
    let (code, out, err) = llm_check(&format!("llm:openai-compatible/gpt-4o@{}", server.url), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(server.requests(), 1, "one small request");
    for needle in [
        "[ok]   key: accepted (key from OPENAI_API_KEY)",
        "[ok]   images: accepted",
        "[ok]   structured output: supported",
        "[ok]   answer: parsed (glioma)",
        // 100 in / 20 out at GPT-4o's list price: $0.00045.
        "cost: about $0.000450 per image (100 in / 20 out tokens; openai/gpt-4o-2024-08-06 at $2.5/$10 per 1M in/out tokens, as of 2026-03)",
        "ready: a run with this spec would work",
    ] {
        assert!(out.contains(needle), "{needle}\n{out}");
    }
    assert!(!out.contains(FAKE_KEY) && !err.contains(FAKE_KEY));
    let sent: serde_json::Value = serde_json::from_str(&server.bodies()[0]).unwrap();
    let image = sent["messages"][1]["content"][1]["image_url"]["url"].as_str().unwrap();
    assert!(image.starts_with("data:image/png;base64,"), "a real image is sent");

    // A model without a price: the cost says so instead of a number.
    let (code, out, _) = llm_check(&format!("llm:openai-compatible/house-vlm@{}", server.url), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cost: unknown price for openai-compatible/house-vlm (100 in / 20 out tokens per image)"), "{out}");
}

#[test]
fn llm_check_fails_with_exit_1_naming_the_status_when_the_key_is_refused() {
    let server = mica_run::testing::Server::start(|_| (401, mica_run::testing::INVALID_KEY.to_string()));
    let (code, out, err) = llm_check(&format!("llm:openai-compatible/gpt-4o@{}", server.url), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("[FAIL] key: refused (HTTP 401"), "{out}");
    assert!(err.contains("not ready"), "{err}");
    assert_eq!(server.requests(), 1, "a refused key is not asked again");

    let server = mica_run::testing::Server::start(|_| {
        (404, r#"{"error":{"message":"The model `gpt-9o` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#.to_string())
    });
    let (code, out, _) = llm_check(&format!("llm:openai-compatible/gpt-9o@{}", server.url), &[]);
    assert_eq!(code, 1);
    assert!(out.contains("[FAIL] model `gpt-9o`: not found (HTTP 404)"), "{out}");
}

#[test]
fn llm_check_falls_back_to_prompted_json_when_structured_output_is_rejected() {
    let server = mica_run::testing::Server::start_routed(|r: &mica_llm::testing::Request| {
        if r.body.contains("response_format") {
            (400, r#"{"error":{"message":"Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.","type":"invalid_request_error","param":"response_format","code":null}}"#.to_string())
        } else {
            (200, mica_run::testing::completion("glioma"))
        }
    });
    let (code, out, err) = llm_check(&format!("llm:openai-compatible/gpt-4-vision@{}", server.url), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("structured output: not supported, prompted JSON will be used"), "{out}");
    assert_eq!(server.requests(), 2);
}

#[test]
fn llm_check_usage_errors_exit_2_and_reasoning_flags_reach_the_request() {
    let (code, _, err) = llm_check("llm:bard/x", &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = llm_check("llm:openai/gpt-4o", &["--reasoning", "--no-reasoning"]);
    assert_eq!(code, 2);
    let server = mica_run::testing::Server::start(|_| (200, mica_run::testing::completion("glioma")));
    let (code, out, _) = llm_check(&format!("llm:openai-compatible/o3-mini@{}", server.url), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("reasoning parameters: used"), "{out}");
    let sent: serde_json::Value = serde_json::from_str(&server.bodies()[0]).unwrap();
    assert_eq!(sent["max_completion_tokens"], 4000, "{sent}");
    assert!(sent.get("temperature").is_none() && sent.get("max_tokens").is_none(), "{sent}");
    let (code, _, _) = llm_check(&format!("llm:openai-compatible/o3-mini@{}", server.url), &["--no-reasoning"]);
    assert_eq!(code, 0);
    let sent: serde_json::Value = serde_json::from_str(&server.bodies()[1]).unwrap();
    assert_eq!(sent["max_tokens"], 200, "{sent}");
}

#[test]
fn classify_sends_reasoning_parameters_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let server = mica_run::testing::Server::start(|_| (200, mica_run::testing::completion("glioma")));
    mica()
        .args(["classify", "--no-cache", "--limit-per-class", "1", "--reasoning", "--dataset"])
        .arg(&ds)
        .arg("--classifier")
        .arg(format!("llm:openai-compatible/house-reasoner@{}", server.url))
        .arg("--out")
        .arg(tmp.path().join("run"))
        .assert()
        .success();
    for b in server.bodies() {
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["max_completion_tokens"], 4000, "{v}");
        assert!(v.get("temperature").is_none(), "{v}");
    }
}

/// Point 6 of the provider work: a secret in a base URL (user-info, a query value) appears in no
/// file a run writes and in nothing it prints, on success (through the simulator) and on failure
/// (an unreachable server, whose transport errors name the URL).
#[test]
fn a_secret_in_the_base_url_is_written_nowhere() {
    const USER_SECRET: &str = "urlpw-NEVER-WRITE-77ab";
    const QUERY_SECRET: &str = "qkey-NEVER-WRITE-31cd";
    let tmp = tempfile::tempdir().unwrap();
    let ds = synth(&tmp.path().join("data"));
    let sim = start_sim(&ds, &["--accuracy", "0.8"]);
    let with_user = sim
        .url
        .replacen("http://", &format!("http://mica:{USER_SECRET}@"), 1);
    let cases = [
        (format!("llm:openai-compatible/sim-vlm@{with_user}"), "ok"),
        (
            format!("llm:openai-compatible/m@http://mica:{USER_SECRET}@127.0.0.1:9/v1?key={QUERY_SECRET}"),
            "down",
        ),
        (
            format!("llm:ollama/llava@http://mica:{USER_SECRET}@127.0.0.1:9?token={QUERY_SECRET}"),
            "down-ollama",
        ),
    ];
    for (spec, name) in cases {
        let out = tmp.path().join(name);
        let cache = tmp.path().join(format!("{name}-cache"));
        let run = mica()
            .env("OPENAI_API_KEY", FAKE_KEY)
            .args(["classify", "--split", "test", "--limit-per-class", "1", "--max-attempts", "1"])
            .arg("--dataset")
            .arg(&ds)
            .arg("--classifier")
            .arg(&spec)
            .arg("--out")
            .arg(&out)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(if name == "ok" { 0 } else { 1 }), "{spec}: {run:?}");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        for secret in [USER_SECRET, QUERY_SECRET] {
            assert!(!printed.contains(secret), "{spec} printed a URL secret: {printed}");
        }
        let files: Vec<PathBuf> = files_under(&out).into_iter().chain(files_under(&cache)).collect();
        assert!(files.iter().any(|f| f.ends_with("predictions.jsonl")), "{files:?}");
        for f in files {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string();
            for secret in [USER_SECRET, QUERY_SECRET, FAKE_KEY] {
                assert!(!text.contains(secret), "{} holds a secret of {spec}", f.display());
            }
        }
    }
}
