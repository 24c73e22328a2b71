//! The OpenAPI document against a fuzzer no one here wrote: schemathesis (PyPI) reads
//! `src/openapi.json`, derives requests from it and sends them to the real broker (a sandbox
//! WeChat, the admin routes on), with every check, in its coverage, fuzzing and stateful phases;
//! the stateful one follows the document's links (login -> session -> logout, login -> the admin
//! routes of that user, a session list -> the revocation of one of its sessions). Our own
//! conformance test (`openapi.rs`) checks our answers; this one checks that the document tells a
//! stranger what the server does. Together they are the contract.
//!
//! `tests/integration/fuzz/` holds the run's settings, with each exclusion and its reason
//! (`schemathesis.toml`), the hooks that give it credentials and sandbox codes (`hooks.py`), and
//! the pinned version (`requirements.txt`), which `.ci/run` installs into `target/schemathesis`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use wxbroker::Secret;

use crate::support::TestBroker;

/// The admin secret of the broker under test.
const ADMIN_TOKEN: &str = "fuzz-test-admin-secret-0123456789abcdef";

/// Seconds schemathesis may spend: the coverage phase runs once, then fuzzing and stateful
/// scenarios repeat until the budget is spent (each round bounded by `max-examples`).
const BUDGET_SECS: u64 = 120;

/// The longest the whole run may take, start-up and reports included, before it is ended.
const LIMIT: Duration = Duration::from_secs(BUDGET_SECS + 300);

/// Where the fuzz settings live, and the venv `.ci/run` installs schemathesis into.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The schemathesis executable, at the pinned version, or a panic that says how to install it.
fn schemathesis() -> PathBuf {
    let pins = include_str!("fuzz/requirements.txt");
    let version = pins
        .lines()
        .find_map(|line| line.strip_prefix("schemathesis=="))
        .expect("requirements.txt pins schemathesis");
    let st = root().join("target/schemathesis/bin/st");
    let install = "python3 -m venv target/schemathesis && target/schemathesis/bin/pip install -r \
                   tests/integration/fuzz/requirements.txt (.ci/run does it)";
    let output = std::process::Command::new(&st)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("schemathesis is not installed at {st:?} ({e}): {install}"));
    let reported = String::from_utf8_lossy(&output.stdout);
    assert!(
        reported.trim_end().ends_with(&format!("version {version}")),
        "{st:?} is not schemathesis {version} (it says {reported:?}): {install}"
    );
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_server_as_the_document_says() {
    let st = schemathesis();
    // The revocation feed on, with a secret schemathesis is not given: it explores the refusals
    // (the stream itself would never end a request).
    let tb = TestBroker::start_with(|c| {
        c.admin_token = Some(Secret::new(ADMIN_TOKEN));
        c.verifier_token = Some(Secret::new(
            "fuzz-verifier-secret-not-given-to-schemathesis",
        ));
    })
    .await;
    // The file schemathesis reads is the document the broker serves.
    let document = root().join("src/openapi.json");
    let served: Value = tb
        .http
        .get(format!("{}/openapi.json", tb.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file: Value = serde_json::from_slice(&std::fs::read(&document).unwrap()).unwrap();
    assert!(
        served == file,
        "the broker serves another document than src/openapi.json"
    );
    // The broker takes logins before the fuzzer's hooks count on them.
    tb.token("fuzzer.ready").await;

    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("report.ndjson");
    let settings = root().join("tests/integration/fuzz");
    let mut command = tokio::process::Command::new(&st);
    command
        .current_dir(work.path())
        .arg("--config-file")
        .arg(settings.join("schemathesis.toml"))
        .arg("run")
        .arg(&document)
        .args(["--url", &tb.url, "--no-color", "--report", "ndjson"])
        .args(["--max-time", &BUDGET_SECS.to_string()])
        .arg("--report-ndjson-path")
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", settings.join("hooks.py"))
        .env("WXBROKER_FUZZ_URL", &tb.url)
        .env("WXBROKER_FUZZ_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    // A seed replays a run (schemathesis prints the one it drew).
    if let Ok(seed) = std::env::var("WXBROKER_FUZZ_SEED") {
        command.args(["--seed", &seed]);
    }
    let started = Instant::now();
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran past {LIMIT:?}; it was ended"))
        .expect("schemathesis starts");
    let elapsed = started.elapsed();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found the server and its document at odds ({}):\n{printed}",
        output.status
    );

    let run = Run::read(&report);
    let operations = operations(&file);
    let requested = operations
        .iter()
        .filter(|op| run.statuses.contains_key(*op))
        .count();
    println!(
        "schemathesis: {} requests in {:.0} s ({}), {} of the document's {} operations, links \
         followed {} times ({} of them); seed {}",
        run.requests(),
        elapsed.as_secs_f64(),
        run.phases
            .iter()
            .map(|(phase, n)| format!("{phase} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        requested,
        operations.len(),
        run.links.values().sum::<usize>(),
        run.links.len(),
        printed
            .lines()
            .find_map(|line| line.strip_prefix("Seed: "))
            .unwrap_or("?"),
    );
    // What makes the run worth its time: every operation was tried, the session routes and the
    // admin's were reached with live credentials, and the stateful phase followed the links.
    let missed: Vec<&String> = operations
        .iter()
        .filter(|op| !run.statuses.contains_key(*op))
        .collect();
    assert!(missed.is_empty(), "never requested: {missed:?}\n{printed}");
    for operation in ["GET /v1/me", "GET /v1/session", "GET /admin/users/{uid}"] {
        assert!(
            run.succeeded(operation),
            "{operation} never succeeded: {:?}\n{printed}",
            run.statuses[operation]
        );
    }
    for phase in ["coverage", "fuzzing", "stateful"] {
        assert!(
            run.phases.get(phase).is_some_and(|n| *n > 0),
            "the {phase} phase sent nothing\n{printed}"
        );
    }
    assert!(
        run.links
            .keys()
            .any(|link| link.starts_with("POST /v1/login -> [200]")),
        "the stateful phase followed no link from a login: {:?}\n{printed}",
        run.links
    );
}

/// Every `METHOD /path` of the document.
fn operations(document: &Value) -> BTreeSet<String> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                operations.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations
}

/// What a run did, from its NDJSON report (one event per line).
struct Run {
    /// Statuses answered, by operation (`METHOD /path/{template}`).
    statuses: BTreeMap<String, BTreeMap<u16, usize>>,
    /// Requests, by phase.
    phases: BTreeMap<String, usize>,
    /// Steps taken through each link of the stateful phase.
    links: BTreeMap<String, usize>,
}

impl Run {
    fn read(path: &Path) -> Run {
        let text = std::fs::read_to_string(path).expect("schemathesis wrote its report");
        let mut run = Run {
            statuses: BTreeMap::new(),
            phases: BTreeMap::new(),
            links: BTreeMap::new(),
        };
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).expect("a report line is JSON");
            let finished = &event["ScenarioFinished"];
            let Some(cases) = finished["recorder"]["cases"].as_object() else {
                continue;
            };
            let phase = finished["phase"].as_str().unwrap_or("?").to_owned();
            let interactions = &finished["recorder"]["interactions"];
            for (id, case) in cases {
                let Some(status) = interactions[id]["response"]["status_code"].as_u64() else {
                    continue;
                };
                let value = &case["value"];
                let operation = format!(
                    "{} {}",
                    value["method"].as_str().unwrap_or("?"),
                    value["path"].as_str().unwrap_or("?")
                );
                *run.statuses
                    .entry(operation)
                    .or_default()
                    .entry(status as u16)
                    .or_default() += 1;
                *run.phases.entry(phase.clone()).or_default() += 1;
                if let Some(link) = case["transition"]["id"].as_str() {
                    *run.links.entry(link.to_owned()).or_default() += 1;
                }
            }
        }
        run
    }

    fn requests(&self) -> usize {
        self.phases.values().sum()
    }

    fn succeeded(&self, operation: &str) -> bool {
        self.statuses
            .get(operation)
            .is_some_and(|statuses| statuses.keys().any(|s| (200..300).contains(s)))
    }
}
