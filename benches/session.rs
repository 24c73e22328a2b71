//! Session checks and logins through the real actors, in process (no HTTP front end; the login's
//! exchange goes to the sandbox WeChat over loopback HTTP).
//!
//! `cargo bench --bench session`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use wxbroker::{Broker, Config, Sandbox, SandboxOptions};

fn session(c: &mut Criterion) {
    // One thread: the figure is the work of a call, not the cost of waking another thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_sandbox, broker, token) = runtime.block_on(async {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        sandbox.configure(&mut config);
        let broker = Broker::start(&config).await.unwrap();
        let token = broker.login("bench.0").await.unwrap().token;
        (sandbox, broker, token)
    });

    c.bench_function("check_session", |b| {
        b.iter(|| {
            runtime
                .block_on(broker.check_session(black_box(&token)))
                .unwrap()
        })
    });

    let mut n = 0u64;
    c.bench_function("login_returning_user", |b| {
        b.iter(|| {
            n += 1;
            runtime
                .block_on(broker.login(&format!("bench.{n}")))
                .unwrap()
        })
    });

    runtime.block_on(broker.shutdown()).unwrap();
}

criterion_group!(benches, session);
criterion_main!(benches);
