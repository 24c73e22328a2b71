//! The pure parts on their own: decrypting a profile, parsing WeChat's answer, writing users and
//! sessions.
//!
//! `cargo bench --bench core`

use std::hint::black_box;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wxbroker::SessionRecord;
use wxbroker::crypto::{
    decrypt_encrypted_data, encrypt_for_client, raw_data_signature, token_hash,
};
use wxbroker::storage::sled::DataDir;
use wxbroker::storage::sled::session_log::SessionLog;
use wxbroker::upstream::parse_code2session;
use wxbroker::{EncryptedData, open_profile};

const KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
const APPID: &str = "wx4f4bc4dec97d474b";
const OPENID: &str = "oGZUI0egBJY1zhBYw2KhdUfwVJJE";

/// A profile the size of a real one (about 450 bytes of JSON, 464 bytes of ciphertext).
fn profile() -> EncryptedData {
    let raw_data = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/aSKcBBPpibyKNicHNTMM0qJVh8Kjgiak2AHWr8MHM4WgMEm7GFhsf8OYrySdbvAMvTsw3mo8ibKicsnfN5pRjl1p8HQ/0"}"#;
    let mut full: serde_json::Value = serde_json::from_str(raw_data).unwrap();
    full["openId"] = OPENID.into();
    full["unionId"] = "ocMvos6NjeKLIBqg5Mr9QjxrP1FA".into();
    full["watermark"] = serde_json::json!({ "appid": APPID, "timestamp": 1477314187 });
    let iv = [7u8; 16];
    EncryptedData {
        encrypted_data: encrypt_for_client(KEY, &iv, full.to_string().as_bytes()).unwrap(),
        iv: STANDARD.encode(iv),
        raw_data: Some(raw_data.to_owned()),
        signature: Some(raw_data_signature(raw_data, KEY)),
    }
}

fn decrypt(c: &mut Criterion) {
    let data = profile();
    let mut group = c.benchmark_group("decrypt");
    group.throughput(Throughput::Elements(1));
    group.bench_function("userinfo_payload", |b| {
        b.iter(|| open_profile(APPID, KEY, OPENID, black_box(&data)).unwrap())
    });
    // The AES-CBC part alone (base64 decoding included), to see where the time goes.
    group.bench_function("aes_cbc_only", |b| {
        b.iter(|| decrypt_encrypted_data(KEY, &data.iv, black_box(&data.encrypted_data)).unwrap())
    });
    group.finish();
}

fn parse(c: &mut Criterion) {
    let body = br#"{"session_key":"tiihtNczf5v6AKRyjwEUhQ==","openid":"oGZUI0egBJY1zhBYw2KhdUfwVJJE","unionid":"ocMvos6NjeKLIBqg5Mr9QjxrP1FA"}"#;
    c.bench_function("parse_code2session", |b| {
        b.iter(|| parse_code2session(200, black_box(body)).unwrap())
    });
}

fn upsert(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path(), 64).unwrap();
    let users = data.users();
    for i in 0..10_000 {
        users.upsert(None, &format!("o{i}"), KEY, None, 1).unwrap();
    }
    let mut n = 0u64;
    c.bench_function("upsert_returning_user", |b| {
        b.iter(|| {
            n += 1;
            users
                .upsert(None, &format!("o{}", n % 10_000), KEY, None, 2)
                .unwrap()
        })
    });
    c.bench_function("upsert_new_user_flushed", |b| {
        b.iter(|| {
            n += 1;
            users
                .upsert(None, &format!("new{n}"), KEY, None, 2)
                .unwrap();
            data.flush().unwrap()
        })
    });
}

fn session_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = SessionLog::open(dir.path()).unwrap();
    let record = |uid: u64| SessionRecord {
        uid,
        appid: None,
        openid: OPENID.to_owned(),
        unionid: None,
        created_at: 1,
        last_seen: 1,
        expires_at: 2,
    };
    // Real token hashes (SHA-256 outputs), as the log and its index see them, made beforehand.
    let hashes: Vec<_> = (0..100_000u64)
        .map(|n| token_hash(&n.to_string()))
        .collect();
    let hash = |n: u64| &hashes[n as usize];
    let mut n = 0u64;
    c.bench_function("session_put", |b| {
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            for _ in 0..iters {
                n += 1;
                log.put(hash(n % 100_000), &record(n)).unwrap();
            }
            let took = started.elapsed();
            // Untimed: what the group commit and the sweep do, so memory and disk stay bounded.
            log.flush().unwrap();
            log.compact().unwrap();
            took
        })
    });
    // A compaction as the sweep starts it: 100,000 live sessions among 400,000 frames. It runs
    // on a thread of its own; the writers only wait for its switch at the end.
    let mut group = c.benchmark_group("session_log");
    group.sample_size(10);
    group.bench_function("compact_100k_of_400k", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let log = SessionLog::open(dir.path()).unwrap();
                for round in 0..4 {
                    for n in 0..100_000 {
                        log.put(hash(n), &record(n + round)).unwrap();
                    }
                }
                log.flush().unwrap();
                (dir, log)
            },
            |(_dir, log)| log.compact().unwrap(),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, decrypt, parse, upsert, session_log);
criterion_main!(benches);
