//! The pure parts on their own: decrypting a profile, parsing WeChat's answer, writing users and
//! sessions.
//!
//! `cargo bench --bench core`

use std::hint::black_box;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wxbroker::crypto::{decrypt_encrypted_data, encrypt_for_client, raw_data_signature};
use wxbroker::store::{SessionRecord, Store};
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
    let store = Store::open(dir.path(), 64).unwrap();
    for i in 0..10_000 {
        store.upsert_user(&format!("o{i}"), KEY, None, 1).unwrap();
    }
    let mut n = 0u64;
    c.bench_function("upsert_returning_user", |b| {
        b.iter(|| {
            n += 1;
            store
                .upsert_user(&format!("o{}", n % 10_000), KEY, None, 2)
                .unwrap()
        })
    });
    c.bench_function("upsert_new_user_flushed", |b| {
        b.iter(|| {
            n += 1;
            store.upsert_user(&format!("new{n}"), KEY, None, 2).unwrap();
            store.db().flush().unwrap()
        })
    });
}

fn session_log(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64).unwrap();
    let record = |uid: u64| SessionRecord {
        uid,
        openid: OPENID.to_owned(),
        unionid: None,
        created_at: 1,
        last_seen: 1,
        expires_at: 2,
    };
    let hash = |n: u64| {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&n.to_le_bytes());
        hash
    };
    let mut n = 0u64;
    c.bench_function("session_put", |b| {
        b.iter(|| {
            n += 1;
            store.put_session(&hash(n), &record(n)).unwrap();
            // Now and then what the keeper's sweep does, so that memory and disk stay bounded.
            if n.is_multiple_of(100_000) {
                store.compact_sessions([]).unwrap();
            }
        })
    });
    // The keeper's pause when it rewrites the log: per 100,000 live sessions.
    let live: Vec<_> = (0..100_000).map(|n| (hash(n), record(n))).collect();
    let mut group = c.benchmark_group("session_log");
    group.sample_size(10);
    group.bench_function("compact_100k_sessions", |b| {
        b.iter(|| {
            let live = live.iter().map(|(hash, record)| (hash, record));
            store.compact_sessions(live).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, decrypt, parse, upsert, session_log);
criterion_main!(benches);
