//! The README's Reliability table names, for each promise, the tests that show it: every test
//! and every file of unit tests it names must exist, or the table has gone stale.

use std::path::{Path, PathBuf};

/// Paths the table names that are no tests: API, ours (`wxbroker::bind`) or warp's.
const NOT_TESTS: [&str; 2] = ["wxbroker", "warp"];

#[test]
fn the_reliability_table_names_only_tests_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table = readme
        .split("\n## Reliability\n")
        .nth(1)
        .expect("README.md has a Reliability section")
        .split("\n## ")
        .next()
        .unwrap();
    let sources = rust_files(&root.join("src"));
    let mut named = 0;
    let mut stale = Vec::new();
    // What is between backticks: `module::test`, `module::*`, `path::to::tests::unit_test`, or a
    // source file holding unit tests.
    for span in table.split('`').skip(1).step_by(2) {
        let found = if let Some(file) = span.strip_suffix(".rs") {
            let file = format!("/{file}.rs");
            sources
                .iter()
                .find(|path| path.to_string_lossy().ends_with(&file))
                .map(|path| std::fs::read_to_string(path).unwrap())
                .is_some_and(|text| has_tests(&text))
        } else if span.contains("::") && is_path(span) {
            let parts: Vec<&str> = span.split("::").collect();
            if NOT_TESTS.contains(&parts[0]) {
                continue;
            }
            let name = parts[parts.len() - 1];
            let integration = root.join(format!("tests/integration/{}.rs", parts[0]));
            let unit = parts
                .iter()
                .position(|&part| part == "tests")
                .map(|at| root.join(format!("src/{}.rs", parts[..at].join("/"))));
            let file = if integration.is_file() {
                integration
            } else {
                unit.unwrap_or(integration)
            };
            std::fs::read_to_string(&file).is_ok_and(|text| {
                // `*`: every test of the file; a name: a test function, or one that a macro
                // makes a test of in several modules (`backends.rs`).
                name == "*"
                    || text.contains(&format!("fn {name}("))
                    || text.contains(&format!("    {name},\n"))
            })
        } else {
            continue;
        };
        named += 1;
        if !found {
            stale.push(span.to_owned());
        }
    }
    assert!(named > 20, "the table names {named} tests: not parsed");
    assert!(
        stale.is_empty(),
        "README.md's Reliability table names tests that do not exist: {stale:?}"
    );
}

/// The README's nginx snippet is an excerpt of `deploy/nginx.conf`, which the nginx tests run:
/// every directive it shows is there, as written.
#[test]
fn the_readme_nginx_snippet_is_from_the_tested_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let config = std::fs::read_to_string(root.join("deploy/nginx.conf")).unwrap();
    let directive = |line: &str| line.split('#').next().unwrap().trim().to_owned();
    let shipped: Vec<String> = config.lines().map(directive).collect();
    let snippet = readme
        .split("```nginx\n")
        .nth(1)
        .expect("README.md shows nginx's configuration")
        .split("```")
        .next()
        .unwrap();
    let shown: Vec<String> = snippet
        .lines()
        .map(directive)
        .filter(|line| !line.is_empty())
        .collect();
    assert!(shown.len() > 10, "{snippet}");
    let missing: Vec<&String> = shown.iter().filter(|l| !shipped.contains(l)).collect();
    assert!(missing.is_empty(), "not in deploy/nginx.conf: {missing:?}");
    // And it leaves out none of the lines that carry the user, whose absence would let a client
    // send its own `X-Wx-` headers through.
    let user_lines = shipped
        .iter()
        .filter(|l| l.contains("X-Wx-") || l.contains("x_wx_"));
    let left_out: Vec<&String> = user_lines.filter(|l| !shown.contains(l)).collect();
    assert!(left_out.is_empty(), "the README leaves out: {left_out:?}");
}

/// Whether `span` is a Rust path (`a::b::c`, `a::*`).
fn is_path(span: &str) -> bool {
    span.split("::").all(|part| {
        part == "*"
            || (!part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
    })
}

/// Whether a source file holds unit tests.
fn has_tests(text: &str) -> bool {
    text.contains("#[test]") || text.contains("#[tokio::test") || text.contains("proptest!")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
