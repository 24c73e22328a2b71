//! The mini program client example (`examples/miniprogram/auth.js`): its Node tests, run against
//! a real broker on loopback, so that the example shown to users keeps working with the broker.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::support::TestBroker;

/// The Node test file, relative to the crate root. A file rather than its directory: Node 21 and
/// later take the arguments of `--test` as glob patterns and no longer search a directory.
const NODE_TESTS: &str = "examples/miniprogram/test/auth.test.js";

#[tokio::test]
async fn the_miniprogram_client_logs_in_and_renews_its_session() {
    let tb = TestBroker::start().await;
    let child = Command::new("node")
        // TAP, whose summary lines are read below: Node 23 and later default to their `spec`
        // reporter even when the output is a pipe. The flag needs Node 18.15 or later.
        .args(["--test", "--test-reporter=tap", NODE_TESTS])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BROKER_URL", &tb.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `node` ({e}): this test needs Node.js (>= 18.15) on the PATH to run \
                 the mini program example's tests; .ci/run installs it"
            )
        });
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("node --test finished within 60 s")
        .expect("node --test ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let hint = if stderr.contains("bad option") {
        " (a Node older than 18.15, without --test-reporter: upgrade it)"
    } else {
        ""
    };
    assert!(
        output.status.success(),
        "node --test {NODE_TESTS} failed ({}){hint}:\n--- stdout ---\n{stdout}\n--- stderr ---\n\
         {stderr}",
        output.status
    );
    // A run that found no tests also exits 0; make sure the tests really ran and passed.
    assert!(
        stdout.lines().any(|l| l == "# fail 0")
            && stdout
                .lines()
                .any(|l| l.strip_prefix("# pass ").is_some_and(|n| n != "0")),
        "node --test {NODE_TESTS} ran no tests:\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
}
