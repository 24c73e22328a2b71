//! Signed access tokens: signing one (what a login adds), and verifying one with
//! `wxbroker::edge::Verifier`, seen before (a cache hit) and for the first time (the signature).
//! The verifier follows a real broker served on loopback in this process.
//!
//! `cargo bench --bench edge`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wxbroker::edge::{Verifier, VerifierOptions};
use wxbroker::jwt::{AccessClaims, SigningKey, sign, thumbprint};
use wxbroker::{Broker, Config, SANDBOX_APPID, Sandbox, SandboxOptions, Secret};

const VERIFIER_TOKEN: &str = "bench-verifier-secret-0123456789abcdef";
/// Distinct tokens cycled through by the first-verification bench.
const FRESH_TOKENS: usize = 2000;

fn signing(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let kid = thumbprint(&key.verifying_key());
    let claims = AccessClaims {
        iss: "wxbroker".into(),
        aud: SANDBOX_APPID.into(),
        appid: Some(SANDBOX_APPID.into()),
        sub: "123456".into(),
        openid: "oGZUI0egBJY1zhBYw2KhdUfwVJJE".into(),
        unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA".into()),
        sid: "ab".repeat(32),
        iat: 1_790_000_000,
        exp: 1_790_000_300,
        jti: "7MU_NEY3XyuQ1YlxRa6PaQ".into(),
    };
    let mut group = c.benchmark_group("access_token");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| {
        b.iter(|| sign(black_box(&key), &kid, black_box(&claims)))
    });
    group.finish();
}

fn verifying(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, cached, fresh, tokens) = runtime.block_on(async {
        let sandbox = Box::leak(Box::new(
            Sandbox::start(SandboxOptions::default()).await.unwrap(),
        ));
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            verifier_token: Some(Secret::new(VERIFIER_TOKEN)),
            login_rate_per_min: 0,
            ..Config::default()
        };
        sandbox.configure(&mut config);
        let broker = Broker::start(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(wxbroker::serve(
            listener,
            broker.clone(),
            std::future::pending(),
        ));
        let start = |capacity: usize| {
            let mut options = VerifierOptions::new(url.as_str(), SANDBOX_APPID, VERIFIER_TOKEN);
            options.cache_capacity = capacity;
            Verifier::start(options).unwrap()
        };
        // A cache of one token per shard: cycling through many tokens, every check is a first.
        let (cached, fresh) = (start(100_000), start(1));
        for verifier in [&cached, &fresh] {
            tokio::time::timeout(Duration::from_secs(10), verifier.synced())
                .await
                .unwrap();
        }
        let session = broker.login("bench.0").await.unwrap().token;
        let mut tokens = Vec::with_capacity(FRESH_TOKENS);
        for _ in 0..FRESH_TOKENS {
            tokens.push(broker.access_token(&session).await.unwrap().token);
        }
        (broker, cached, fresh, tokens)
    });

    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    let token = &tokens[0];
    cached.check(token).unwrap();
    group.bench_function("seen_before", |b| {
        b.iter(|| cached.check(black_box(token)).unwrap())
    });
    let mut next = 0;
    group.bench_function("first_time", |b| {
        b.iter(|| {
            next = (next + 1) % tokens.len();
            fresh.check(black_box(&tokens[next])).unwrap()
        })
    });
    group.finish();
    drop((cached, fresh));
    runtime.block_on(broker.shutdown()).unwrap();
}

criterion_group!(benches, signing, verifying);
criterion_main!(benches);
