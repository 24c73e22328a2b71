//! The OpenAPI document against the real broker. `/openapi.json` is fetched from a running broker
//! (so what is checked is what is served); then every exchange below goes through [`Api::send`],
//! which asserts that the answer's status is documented for that path and method, that its body
//! is valid against the documented schema for its content type (JSON Schema 2020-12, `$ref`s
//! resolved against the document), and that the documented headers are there. A successful
//! request is checked too: its body, query and path parameters must match what the document asks.
//! At the end every operation of the document must have been exercised, so that the document
//! cannot drift from the routes unnoticed; paths outside the document must answer 404, and
//! methods a documented path does not take 405 with an `Allow` header naming the ones it takes,
//! which `OPTIONS` answers too (204); `HEAD` is answered wherever GET is, as GET without the body.

use std::collections::BTreeSet;

use bytes::Bytes;
use reqwest::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use wxbroker::{SANDBOX_APPID, Sandbox, Secret};

use crate::support::{TestBroker, fault_upstream};

/// The admin secret of the broker under test.
const ADMIN_TOKEN: &str = "openapi-test-admin-secret-at-least-32-chars";
/// The revocation feed's secret of the broker under test.
const VERIFIER_TOKEN: &str = "openapi-test-verifier-secret-0123456789";

/// The budget of calls to WeChat per user and minute of the broker under test: room for alice's
/// phone numbers by code below, and few enough for bob to spend his.
const WECHAT_CALLS_PER_MIN: u32 = 8;

/// The methods an operation of the document may have (the broker serves no others).
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The served document, and the operations the exchanges have covered.
struct Api {
    doc: Value,
    exercised: BTreeSet<(String, String)>,
}

impl Api {
    /// Fetches and parses the document `tb` serves.
    async fn fetch(tb: &TestBroker) -> Api {
        let response = tb
            .http
            .get(format!("{}/openapi.json", tb.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let doc: Value = serde_json::from_slice(&response.bytes().await.unwrap())
            .expect("/openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0", "an OpenAPI 3.1 document");
        Api {
            doc,
            exercised: BTreeSet::new(),
        }
    }

    /// Follows `$ref`s within the document.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("$ref {reference} leaves the document"));
            value = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("$ref {reference} points at nothing"));
        }
        value
    }

    /// A validator for `schema`, a schema taken from the document.
    fn validator(&self, schema: &Value, what: &str) -> jsonschema::Validator {
        // The document's `components` go along as an unknown keyword of the root, so that the
        // schema's `#/components/schemas/...` references resolve exactly as in the document.
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "allOf": [schema],
            "components": self.doc["components"],
        });
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
            .unwrap_or_else(|e| panic!("{what}: the documented schema does not compile: {e}"))
    }

    /// Asserts that `instance` is valid against `schema`, a schema taken from the document.
    fn validate(&self, schema: &Value, instance: &Value, what: &str) {
        let validator = self.validator(schema, what);
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("  {e} (at `{}`)", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: {instance} does not match the document:\n{}",
            errors.join("\n")
        );
    }

    /// The documented path template that the concrete `path` falls under, if any.
    fn template(&self, path: &str) -> Option<String> {
        let segments = segments(path);
        self.doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(part, segment)| {
                        part == segment
                            || (part.starts_with('{') && part.ends_with('}') && !segment.is_empty())
                    })
            })
            .cloned()
    }

    /// What `Allow` must say for a documented path: its methods, HEAD with GET, and OPTIONS.
    fn allowed(&self, template: &str) -> BTreeSet<String> {
        let item = &self.doc["paths"][template];
        let mut methods: BTreeSet<String> = METHODS
            .into_iter()
            .filter(|m| item.get(*m).is_some())
            .map(str::to_uppercase)
            .collect();
        if item.get("get").is_some() {
            methods.insert("HEAD".into());
        }
        methods.insert("OPTIONS".into());
        methods
    }

    /// Every `(path, method)` of the document.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut operations = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    operations.insert((path.clone(), method.to_owned()));
                }
            }
        }
        operations
    }

    /// Sends `request`, asserts it answered `expect`, and checks the exchange against the
    /// document. Returns the body: JSON, a JSON string for other text, or null when empty.
    async fn send(&mut self, request: RequestBuilder, expect: StatusCode) -> Value {
        self.exchange(request, expect).await.0
    }

    /// As [`Api::send`] for a 200 answer that stays open (an event stream): reads it until its
    /// text holds `until`, then checks what was read.
    async fn stream(&mut self, request: RequestBuilder, until: &str) -> String {
        let (client, request) = request.build_split();
        let request = request.unwrap();
        let url = request.url().clone();
        let what = format!("GET {}?{}", url.path(), url.query().unwrap_or_default());
        let sent = Sent {
            body: None,
            media: None,
            bearer: request.headers().contains_key(AUTHORIZATION),
            query: url.query_pairs().into_owned().collect(),
        };
        let mut response = client.execute(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{what}");
        let headers = response.headers().clone();
        let mut text = String::new();
        let read = async {
            while !text.contains(until) {
                let chunk = response.chunk().await.unwrap().expect("the stream goes on");
                text.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("{what}: no {until:?} within 10 s: {text}"));
        let template = self.template(url.path()).unwrap();
        let operation = self.doc["paths"][&template]["get"].clone();
        self.exercised.insert((template.clone(), "get".into()));
        let documented = operation["responses"]["200"].clone();
        self.check_answer(&what, &documented, &headers, &Bytes::from(text.clone()));
        self.check_request(&what, &template, &operation, &url, &sent);
        text
    }

    /// As [`Api::send`], with the answer's headers.
    async fn exchange(
        &mut self,
        request: RequestBuilder,
        expect: StatusCode,
    ) -> (Value, HeaderMap) {
        let (client, request) = request.build_split();
        let request = request.unwrap();
        let method = request.method().as_str().to_ascii_lowercase();
        let url = request.url().clone();
        let what = format!(
            "{} {}{}",
            request.method(),
            url.path(),
            url.query().map(|q| format!("?{q}")).unwrap_or_default()
        );
        let sent = Sent {
            body: request
                .body()
                .and_then(|b| b.as_bytes())
                .map(Bytes::copy_from_slice),
            media: request.headers().get(CONTENT_TYPE).map(essence),
            bearer: request
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Bearer ")),
            query: url.query_pairs().into_owned().collect(),
        };
        let response = client.execute(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        assert_eq!(status, expect, "{what}: {}", String::from_utf8_lossy(&body));

        let Some(template) = self.template(url.path()) else {
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{what}: the path is not in the document, yet it answered {status}"
            );
            let documented = self.doc["components"]["responses"]["NotFound"].clone();
            return (
                self.check_answer(&what, &documented, &headers, &body),
                headers,
            );
        };
        // HEAD is GET's answer without the body.
        let head = method == "head" && self.doc["paths"][&template].get("get").is_some();
        let operation = self.doc["paths"][&template]
            .get(if head { "get" } else { &method })
            .cloned();
        if status == StatusCode::METHOD_NOT_ALLOWED
            || (method == "options" && status == StatusCode::NO_CONTENT)
        {
            let allowed = self.allowed(&template);
            let allow = headers
                .get(ALLOW)
                .unwrap_or_else(|| panic!("{what}: no Allow header"))
                .to_str()
                .unwrap();
            let given: BTreeSet<String> = allow.split(',').map(|m| m.trim().to_owned()).collect();
            assert_eq!(given, allowed, "{what}: Allow: {allow}");
        }
        if method == "options" && status == StatusCode::NO_CONTENT {
            assert!(body.is_empty(), "{what}: a body");
            return (Value::Null, headers);
        }
        if method == "head" {
            assert!(body.is_empty(), "{what}: HEAD answered with a body");
        }
        if head && status != StatusCode::METHOD_NOT_ALLOWED {
            let responses = &operation.as_ref().unwrap()["responses"];
            let documented = responses
                .get(status.as_str())
                .unwrap_or_else(|| panic!("{what}: {status} is not documented for GET {template}"));
            let documented = self.resolve(documented).clone();
            let without_body =
                json!({ "headers": documented.get("headers").cloned().unwrap_or(json!({})) });
            self.check_answer(&what, &without_body, &headers, &body);
            return (Value::Null, headers);
        }
        if method == "head" {
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{what}");
            return (Value::Null, headers);
        }
        let Some(operation) = operation else {
            let generic = match status {
                StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
                // The admin routes answer 404 to everything while they are off, and 401 to
                // everything without the admin token.
                StatusCode::NOT_FOUND if template.starts_with("/admin/") => "NotFound",
                StatusCode::UNAUTHORIZED if template.starts_with("/admin/") => "AdminUnauthorized",
                _ => panic!(
                    "{what}: {template} takes no {method} in the document, yet it answered {status}"
                ),
            };
            let documented = self.doc["components"]["responses"][generic].clone();
            return (
                self.check_answer(&what, &documented, &headers, &body),
                headers,
            );
        };
        self.exercised.insert((template.clone(), method.clone()));

        let responses = &operation["responses"];
        let documented = responses
            .get(status.as_str())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: {status} is not documented for {} {template}",
                    method.to_uppercase()
                )
            });
        let answer = self.check_answer(&what, documented, &headers, &body);
        if status.is_success() {
            self.check_request(&what, &template, &operation, &url, &sent);
        }
        (answer, headers)
    }

    /// Checks an answer against the documented response object `documented`.
    fn check_answer(
        &self,
        what: &str,
        documented: &Value,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Value {
        let documented = self.resolve(documented);
        let documented_headers = documented.get("headers").and_then(Value::as_object);
        for (name, header) in documented_headers.into_iter().flatten() {
            let header = self.resolve(header);
            let schema = self.resolve(&header["schema"]);
            match headers.get(name.as_str()) {
                None => assert!(
                    !header["required"].as_bool().unwrap_or(false),
                    "{what}: the documented header {name} is missing"
                ),
                Some(value) => {
                    let text = value.to_str().unwrap();
                    let value = match schema["type"].as_str() {
                        Some("integer") => text
                            .parse::<i64>()
                            .map(Value::from)
                            .unwrap_or_else(|_| Value::from(text)),
                        _ => Value::from(text),
                    };
                    self.validate(schema, &value, &format!("{what}: header {name}"));
                }
            }
        }
        let Some(content) = documented.get("content").and_then(Value::as_object) else {
            assert!(
                body.is_empty(),
                "{what}: documented without a body, yet it answered {}",
                String::from_utf8_lossy(body)
            );
            return Value::Null;
        };
        let media = headers
            .get(CONTENT_TYPE)
            .map(essence)
            .unwrap_or_else(|| panic!("{what}: a body without a Content-Type"));
        let media_type = content.get(&media).unwrap_or_else(|| {
            panic!(
                "{what}: {media} is not documented for this status (only {:?})",
                content.keys().collect::<Vec<_>>()
            )
        });
        let instance = if media == "application/json" {
            serde_json::from_slice(body).unwrap_or_else(|e| {
                panic!(
                    "{what}: the body is not JSON ({e}): {}",
                    String::from_utf8_lossy(body)
                )
            })
        } else {
            Value::from(String::from_utf8(body.to_vec()).expect("a text body is UTF-8"))
        };
        self.validate(&media_type["schema"], &instance, what);
        instance
    }

    /// Checks that a request that succeeded is one the document describes: its credentials,
    /// its parameters and its body.
    fn check_request(
        &self,
        what: &str,
        template: &str,
        operation: &Value,
        url: &reqwest::Url,
        sent: &Sent,
    ) {
        let secured = operation["security"]
            .as_array()
            .is_some_and(|s| !s.is_empty());
        assert_eq!(
            secured, sent.bearer,
            "{what}: succeeded, but the document says security is {}",
            operation["security"]
        );
        let parameters: Vec<&Value> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| self.resolve(p))
            .collect();
        // An exploded object parameter (`style: form`, `explode: true`) is sent as its
        // properties, each a query parameter of its own.
        let exploded = parameters
            .iter()
            .find(|p| p["in"] == "query" && p["explode"] == true && p["style"] == "form");
        let mut object = serde_json::Map::new();
        for (name, value) in &sent.query {
            match parameters
                .iter()
                .find(|p| p["in"] == "query" && p["name"] == name.as_str())
            {
                Some(parameter) => self.validate(
                    &parameter["schema"],
                    &Value::from(value.as_str()),
                    &format!("{what}: query {name}"),
                ),
                None => {
                    let fresh = object.insert(name.clone(), Value::from(value.as_str()));
                    assert!(fresh.is_none(), "{what}: succeeded with {name} twice");
                }
            }
        }
        match exploded {
            Some(parameter) => self.validate(
                &parameter["schema"],
                &Value::Object(object),
                &format!("{what}: query {}", parameter["name"]),
            ),
            None => assert!(
                object.is_empty(),
                "{what}: succeeded with the undocumented query {:?}",
                object.keys().collect::<Vec<_>>()
            ),
        }
        let segments = segments(url.path());
        for (part, segment) in template.split('/').zip(&segments) {
            let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
                continue;
            };
            let parameter = parameters
                .iter()
                .find(|p| p["in"] == "path" && p["name"] == name)
                .unwrap_or_else(|| panic!("{what}: path parameter {name} is not documented"));
            let value = segment
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(*segment));
            self.validate(
                &parameter["schema"],
                &value,
                &format!("{what}: path parameter {name}"),
            );
        }
        match (&operation["requestBody"], &sent.body) {
            (Value::Null, None) => {}
            (Value::Null, Some(_)) => {
                panic!("{what}: succeeded with a body the document does not take")
            }
            (documented, body) => {
                let body = body.clone().unwrap_or_default();
                let media = sent
                    .media
                    .clone()
                    .unwrap_or_else(|| "application/json".into());
                let schema = &self.resolve(documented)["content"][&media]["schema"];
                assert!(
                    !schema.is_null(),
                    "{what}: succeeded with a {media} body, which is not documented"
                );
                let instance: Value = if media == "application/x-www-form-urlencoded" {
                    let fields: Vec<(String, String)> =
                        serde_urlencoded::from_bytes(&body).unwrap();
                    fields
                        .into_iter()
                        .map(|(k, v)| (k, Value::from(v)))
                        .collect::<serde_json::Map<_, _>>()
                        .into()
                } else {
                    serde_json::from_slice(&body).unwrap()
                };
                self.validate(schema, &instance, &format!("{what}: request body"));
            }
        }
    }
}

/// What a request carried, for [`Api::check_request`].
struct Sent {
    body: Option<Bytes>,
    media: Option<String>,
    bearer: bool,
    query: Vec<(String, String)>,
}

/// The segments of a request path. warp matches a path with one trailing slash as the path
/// itself (`/healthz/` is `/healthz`), so the trailing slash is dropped here too.
fn segments(path: &str) -> Vec<&str> {
    let path = match path.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => path,
    };
    path.split('/').collect()
}

/// The media type of a Content-Type value, without parameters.
fn essence(value: &HeaderValue) -> String {
    value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Every `$ref` under `value`.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => found.push(reference),
                    _ => refs(value, found),
                }
            }
        }
        Value::Array(values) => values.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

/// The document on its own: references resolve, schemas compile, names are unique, and
/// every operation says what it answers.
fn check_document(api: &Api) {
    let mut found = Vec::new();
    refs(&api.doc, &mut found);
    for reference in found {
        assert!(
            reference.starts_with("#/components/"),
            "$ref {reference} should point into components"
        );
        api.resolve(&json!({ "$ref": reference }));
    }
    for (name, schema) in api.doc["components"]["schemas"].as_object().unwrap() {
        api.validator(schema, &format!("components/schemas/{name}"));
    }
    let schemes = api.doc["components"]["securitySchemes"]
        .as_object()
        .unwrap();
    let mut ids = BTreeSet::new();
    for (path, method) in api.operations() {
        let what = format!("{} {path}", method.to_uppercase());
        let operation = &api.doc["paths"][&path][&method];
        let id = operation["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no operationId"));
        assert!(ids.insert(id), "{what}: operationId {id} is used twice");
        for requirement in operation["security"].as_array().into_iter().flatten() {
            for scheme in requirement.as_object().unwrap().keys() {
                assert!(
                    schemes.contains_key(scheme),
                    "{what}: unknown security scheme {scheme}"
                );
            }
        }
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        // Links name an operation of the document, and path parameters it has.
        for (status, response) in responses {
            let links = api.resolve(response)["links"].as_object().cloned();
            for (name, link) in links.into_iter().flatten() {
                let target = link["operationId"].as_str().unwrap();
                let (path, method) = api
                    .operations()
                    .into_iter()
                    .find(|(p, m)| api.doc["paths"][p][m]["operationId"] == target)
                    .unwrap_or_else(|| panic!("{what} {status} link {name}: no {target}"));
                for parameter in link["parameters"].as_object().unwrap().keys() {
                    if let Some(name) = parameter.strip_prefix("path.") {
                        assert!(
                            path.contains(&format!("{{{name}}}")),
                            "{what} {status} link {name}: {method} {path} has no {parameter}"
                        );
                    }
                }
            }
        }
        for (status, response) in responses {
            let response = api.resolve(response);
            assert!(
                response["description"].is_string(),
                "{what} {status}: no description"
            );
            for (media, media_type) in response["content"].as_object().into_iter().flatten() {
                api.validator(&media_type["schema"], &format!("{what} {status} {media}"));
            }
        }
    }
}

/// The sandbox's profile of `name` with only an openId and a nickName (the rest null).
fn sparse_profile(name: &str) -> String {
    json!({
        "openId": Sandbox::openid_of(name),
        "nickName": name,
        "watermark": { "appid": SANDBOX_APPID, "timestamp": 1_790_000_000 },
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_every_route_and_what_it_answers() {
    let tb = TestBroker::start_with(|c| {
        c.admin_token = Some(Secret::new(ADMIN_TOKEN));
        c.verifier_token = Some(Secret::new(VERIFIER_TOKEN));
        c.wechat_calls_per_min = WECHAT_CALLS_PER_MIN;
    })
    .await;
    let mut api = Api::fetch(&tb).await;
    check_document(&api);

    let url = |path: &str| format!("{}{path}", tb.url);
    let get = |path: &str| tb.http.get(url(path));
    let post = |path: &str| tb.http.post(url(path));
    let admin =
        |method: Method, path: &str| tb.http.request(method, url(path)).bearer_auth(ADMIN_TOKEN);
    use StatusCode as S;

    // Operations: this document, health, readiness, metrics.
    let served = api.send(get("/openapi.json"), S::OK).await;
    assert_eq!(served, api.doc);
    assert_eq!(api.send(get("/healthz"), S::OK).await["status"], "ok");
    assert_eq!(api.send(get("/readyz"), S::OK).await["status"], "ready");

    // Logins: JSON and form, new and returning, and every error the sandbox can provoke.
    let login = |code: &str| post("/v1/login").json(&json!({ "code": code }));
    let alice = api.send(login("alice.union.1"), S::OK).await;
    assert_eq!(alice["isNew"], true);
    let alice_uid = alice["uid"].as_u64().unwrap();
    let alice_token = alice["thirdSession"].as_str().unwrap().to_owned();
    let again = api
        .send(post("/v1/login").form(&[("code", "alice.2")]), S::OK)
        .await;
    assert_eq!(
        (again["isNew"].as_bool(), again["uid"].as_u64()),
        (Some(false), Some(alice_uid))
    );
    let alice_token2 = again["thirdSession"].as_str().unwrap().to_owned();
    let bob = api.send(login("bob.1"), S::OK).await;
    let bob_token = bob["thirdSession"].as_str().unwrap().to_owned();

    // Signed access tokens: with each login, fresh from /v1/token, and the keys that verify them.
    assert!(alice["accessToken"].is_string() && again["accessToken"].is_string());
    let minted = api
        .send(post("/v1/token").bearer_auth(&alice_token), S::OK)
        .await;
    assert_eq!(minted["accessTokenExpiresIn"], 300);
    api.send(post("/v1/token"), S::UNAUTHORIZED).await;
    api.send(
        post("/v1/token").bearer_auth("not-a-token"),
        S::UNAUTHORIZED,
    )
    .await;
    let (keys, headers) = api.exchange(get("/.well-known/jwks.json"), S::OK).await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(headers["cache-control"], "public, max-age=60");

    for body in [
        json!({}),
        json!({ "code": "" }),
        json!({ "code": "x".repeat(257) }),
        json!({ "code": 7 }),
    ] {
        api.send(post("/v1/login").json(&body), S::BAD_REQUEST)
            .await;
    }
    let malformed = post("/v1/login")
        .header(CONTENT_TYPE, "application/json")
        .body("{\"code\":");
    api.send(malformed, S::BAD_REQUEST).await;
    api.send(login("err40029"), S::UNAUTHORIZED).await;
    assert_eq!(
        api.send(login("alice.union.1"), S::UNAUTHORIZED).await["error"],
        "code_used"
    );
    api.send(login("err40226"), S::FORBIDDEN).await;
    let huge = json!({ "code": "a".repeat(70 * 1024) });
    api.send(post("/v1/login").json(&huge), S::PAYLOAD_TOO_LARGE)
        .await;
    api.send(
        post("/v1/login")
            .header(CONTENT_TYPE, "text/plain")
            .body("code=alice.9"),
        S::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;
    api.send(login("err45011"), S::TOO_MANY_REQUESTS).await;
    api.send(login("err40013"), S::BAD_GATEWAY).await;
    let (busy, headers) = api.exchange(login("err-1"), S::SERVICE_UNAVAILABLE).await;
    assert_eq!(busy["error"], "upstream_busy");
    assert!(
        headers.contains_key(RETRY_AFTER),
        "upstream_busy carries Retry-After"
    );

    // Sessions: with and without a unionid; missing, foreign, unknown and malformed tokens.
    let session = api
        .send(get("/v1/session").bearer_auth(&alice_token), S::OK)
        .await;
    assert_eq!(session["unionid"], Sandbox::unionid_of("alice"));
    let session = api
        .send(get("/v1/session").bearer_auth(&bob_token), S::OK)
        .await;
    assert_eq!(session["unionid"], Value::Null);
    api.send(get("/v1/session"), S::UNAUTHORIZED).await;
    api.send(
        get("/v1/session").basic_auth("alice", Some("x")),
        S::UNAUTHORIZED,
    )
    .await;
    api.send(
        get("/v1/session").bearer_auth("not-a-token"),
        S::UNAUTHORIZED,
    )
    .await;
    let garbled = HeaderValue::from_bytes(b"Bearer \xffgarbled").unwrap();
    api.send(
        get("/v1/session").header(AUTHORIZATION, garbled.clone()),
        S::UNAUTHORIZED,
    )
    .await;
    // Forward auth: the same answers in headers, without a body.
    api.send(get("/v1/auth").bearer_auth(&alice_token), S::OK)
        .await;
    api.send(get("/v1/auth").bearer_auth(&bob_token), S::OK)
        .await;
    api.send(get("/v1/auth"), S::UNAUTHORIZED).await;
    api.send(get("/v1/auth").bearer_auth("not-a-token"), S::UNAUTHORIZED)
        .await;

    // The profile: signed, sparse (nulls), and each way it can be refused.
    let userinfo = |token: &str| post("/v1/userinfo").bearer_auth(token);
    let profile = tb.sandbox.encrypted_profile("alice").unwrap();
    let stored = api.send(userinfo(&alice_token).json(&profile), S::OK).await;
    assert_eq!(stored["openId"], Sandbox::openid_of("alice"));
    let sparse = tb
        .sandbox
        .encrypt_for("bob", sparse_profile("bob").as_bytes())
        .unwrap();
    let stored = api.send(userinfo(&bob_token).json(&sparse), S::OK).await;
    assert_eq!(
        (stored["nickName"].as_str(), &stored["city"]),
        (Some("bob"), &Value::Null)
    );
    let form = [
        ("encryptedData", profile.encrypted_data.as_str()),
        ("iv", profile.iv.as_str()),
    ];
    api.send(userinfo(&alice_token).form(&form), S::OK).await;
    let mut bad_iv = profile.clone();
    bad_iv.iv = "not base64!".into();
    api.send(userinfo(&alice_token).json(&bad_iv), S::BAD_REQUEST)
        .await;
    let mut unsigned = profile.clone();
    unsigned.signature = None;
    api.send(userinfo(&alice_token).json(&unsigned), S::BAD_REQUEST)
        .await;
    api.send(post("/v1/userinfo").json(&profile), S::UNAUTHORIZED)
        .await;
    let mut not_a_sha1 = profile.clone();
    not_a_sha1.signature = Some("0".repeat(39));
    api.send(userinfo(&alice_token).json(&not_a_sha1), S::BAD_REQUEST)
        .await;
    let mut tampered = profile.clone();
    tampered.signature = Some("0".repeat(40));
    assert_eq!(
        api.send(userinfo(&alice_token).json(&tampered), S::FORBIDDEN)
            .await["error"],
        "signature_mismatch"
    );
    let someone_else = tb
        .sandbox
        .encrypt_for("alice", sparse_profile("zed").as_bytes())
        .unwrap();
    assert_eq!(
        api.send(userinfo(&alice_token).json(&someone_else), S::FORBIDDEN)
            .await["error"],
        "openid_mismatch"
    );
    // A unionid other than the one alice's login gave is refused, whoever holds it.
    let mut other_unionid: Value = serde_json::from_str(&sparse_profile("alice")).unwrap();
    other_unionid["unionId"] = json!("u-not-alices");
    let other_unionid = tb
        .sandbox
        .encrypt_for("alice", other_unionid.to_string().as_bytes())
        .unwrap();
    assert_eq!(
        api.send(userinfo(&alice_token).json(&other_unionid), S::CONFLICT)
            .await["error"],
        "unionid_conflict"
    );
    api.send(
        userinfo(&alice_token).json(&json!({ "encryptedData": "a".repeat(70 * 1024), "iv": "x" })),
        S::PAYLOAD_TOO_LARGE,
    )
    .await;
    api.send(
        userinfo(&alice_token)
            .header(CONTENT_TYPE, "text/xml")
            .body("<x/>"),
        S::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;

    // The phone number, likewise.
    let phone = |token: &str| post("/v1/phone").bearer_auth(token);
    let number = tb.sandbox.encrypted_phone("alice", "13912345678").unwrap();
    let stored = api.send(phone(&alice_token).json(&number), S::OK).await;
    assert_eq!(stored["purePhoneNumber"], "13912345678");
    let form = [
        ("encryptedData", number.encrypted_data.as_str()),
        ("iv", number.iv.as_str()),
    ];
    api.send(phone(&alice_token).form(&form), S::OK).await;
    let mut bad_iv = number.clone();
    bad_iv.iv = "AAAA".into();
    api.send(phone(&alice_token).json(&bad_iv), S::BAD_REQUEST)
        .await;
    api.send(post("/v1/phone").json(&number), S::UNAUTHORIZED)
        .await;
    let other_app = json!({
        "phoneNumber": "1", "purePhoneNumber": "1", "countryCode": "86",
        "watermark": { "appid": "wx-other-app", "timestamp": 1 },
    });
    let other_app = tb
        .sandbox
        .encrypt_for("alice", other_app.to_string().as_bytes())
        .unwrap();
    assert_eq!(
        api.send(phone(&alice_token).json(&other_app), S::FORBIDDEN)
            .await["error"],
        "watermark_mismatch"
    );
    api.send(
        phone(&alice_token).json(&json!({ "encryptedData": "a".repeat(70 * 1024), "iv": "x" })),
        S::PAYLOAD_TOO_LARGE,
    )
    .await;
    api.send(
        phone(&alice_token)
            .header(CONTENT_TYPE, "text/plain")
            .body("x"),
        S::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;

    // The phone number by code (getuserphonenumber), and what WeChat may answer to it.
    let by_code = |token: &str, code: &str| phone(token).json(&json!({ "code": code }));
    let stored = api
        .send(by_code(&alice_token, "13912345678.a"), S::OK)
        .await;
    assert_eq!(stored["purePhoneNumber"], "13912345678");
    api.send(
        phone(&alice_token).form(&[("code", "13912345678.b")]),
        S::OK,
    )
    .await;
    assert_eq!(
        api.send(by_code(&alice_token, "13912345678.a"), S::BAD_REQUEST)
            .await["error"],
        "invalid_phone_code"
    );
    // The button's whole e.detail, code and encrypted form both: the code is used.
    let both = json!({
        "errMsg": "getPhoneNumber:ok",
        "code": "13912345678.c",
        "encryptedData": "AAAA",
        "iv": "AAAA",
        "cloudID": "cloud-1",
    });
    let stored = api.send(phone(&alice_token).json(&both), S::OK).await;
    assert_eq!(stored["purePhoneNumber"], "13912345678");
    api.send(
        phone(&alice_token).json(&json!({ "errMsg": "getPhoneNumber:fail user deny" })),
        S::BAD_REQUEST,
    )
    .await;
    api.send(by_code(&alice_token, "err45011"), S::TOO_MANY_REQUESTS)
        .await;
    api.send(by_code(&alice_token, "err-1"), S::SERVICE_UNAVAILABLE)
        .await;
    api.send(by_code(&alice_token, "err99999"), S::BAD_GATEWAY)
        .await;

    // The session_key check with WeChat.
    let verify = |token: &str| get("/v1/session?verify=wechat").bearer_auth(token);
    let verified = api.send(verify(&bob_token), S::OK).await;
    assert_eq!(verified["sessionKeyValid"], true);
    api.send(
        get("/v1/session?verify=other").bearer_auth(&bob_token),
        S::BAD_REQUEST,
    )
    .await;
    tb.sandbox.rotate_session_key("bob");
    // WeChat's "valid" is reused for a minute; then WeChat is asked again, in a new minute of
    // the budget.
    tb.clock.advance(60);
    let expired = api.send(verify(&bob_token), S::UNAUTHORIZED).await;
    assert_eq!(
        (&expired["error"], &expired["relogin"]),
        (&json!("session_key_expired"), &json!(true))
    );
    // A stale key's answer is never reused: each check asks WeChat, until bob's calls to WeChat
    // for this minute are spent.
    for _ in 1..WECHAT_CALLS_PER_MIN {
        api.send(verify(&bob_token), S::UNAUTHORIZED).await;
    }
    let (spent, headers) = api.exchange(verify(&bob_token), S::TOO_MANY_REQUESTS).await;
    assert_eq!(spent["error"], "rate_limited");
    assert!(headers.contains_key(RETRY_AFTER), "{headers:?}");

    // The session_key rotates with a new login: data obtained before it cannot be decrypted.
    let old_profile = tb.sandbox.encrypted_profile("alice").unwrap();
    let old_number = tb.sandbox.encrypted_phone("alice", "13800138000").unwrap();
    let rotated = api.send(login("alice.3"), S::OK).await;
    let alice_token3 = rotated["thirdSession"].as_str().unwrap().to_owned();
    let refused = api
        .send(
            userinfo(&alice_token3).json(&old_profile),
            S::UNPROCESSABLE_ENTITY,
        )
        .await;
    assert_eq!(refused["relogin"], true);
    api.send(
        phone(&alice_token3).json(&old_number),
        S::UNPROCESSABLE_ENTITY,
    )
    .await;

    // The stored user: with a profile and a phone, and without.
    let me = api
        .send(get("/v1/me").bearer_auth(&alice_token), S::OK)
        .await;
    assert_eq!(me["phone"]["purePhoneNumber"], "13912345678");
    let me = api.send(get("/v1/me").bearer_auth(&bob_token), S::OK).await;
    assert_eq!(
        (&me["phone"], &me["profile"]["city"]),
        (&Value::Null, &Value::Null)
    );
    let carol = api.send(login("carol.1"), S::OK).await;
    let carol_token = carol["thirdSession"].as_str().unwrap().to_owned();
    let me = api
        .send(get("/v1/me").bearer_auth(&carol_token), S::OK)
        .await;
    assert_eq!((&me["phone"], &me["profile"]), (&Value::Null, &Value::Null));
    api.send(get("/v1/me"), S::UNAUTHORIZED).await;

    // Logout, after which the token is refused.
    api.send(post("/v1/logout").bearer_auth(&carol_token), S::NO_CONTENT)
        .await;
    api.send(
        post("/v1/logout").bearer_auth(&carol_token),
        S::UNAUTHORIZED,
    )
    .await;
    api.send(
        get("/v1/session").bearer_auth(&carol_token),
        S::UNAUTHORIZED,
    )
    .await;
    api.send(get("/v1/me").bearer_auth(&carol_token), S::UNAUTHORIZED)
        .await;
    api.send(
        post("/v1/logout").header(AUTHORIZATION, garbled.clone()),
        S::UNAUTHORIZED,
    )
    .await;

    // Admin: users by uid, openid and unionid.
    let by_uid = format!("/admin/users/{alice_uid}");
    let user = api.send(admin(Method::GET, &by_uid), S::OK).await;
    assert_eq!(user["openid"], Sandbox::openid_of("alice"));
    api.send(get(&by_uid), S::UNAUTHORIZED).await;
    api.send(get(&by_uid).bearer_auth("wrong"), S::UNAUTHORIZED)
        .await;
    api.send(get(&by_uid).bearer_auth(&alice_token), S::UNAUTHORIZED)
        .await;
    api.send(
        get(&by_uid).header(AUTHORIZATION, garbled.clone()),
        S::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        api.send(admin(Method::GET, "/admin/users/999999"), S::NOT_FOUND)
            .await["error"],
        "user_not_found"
    );
    // A uid is a whole number from 1 to u64::MAX on every route that takes one.
    for uid in ["alice", "0", "-1", "+1", "1.0", "18446744073709551616"] {
        for (method, path) in [
            (Method::GET, format!("/admin/users/{uid}")),
            (Method::GET, format!("/admin/users/{uid}/sessions")),
            (Method::DELETE, format!("/admin/users/{uid}/sessions")),
            (
                Method::POST,
                format!("/admin/users/{uid}/session-key/reset"),
            ),
        ] {
            api.send(admin(method, &path), S::BAD_REQUEST).await;
        }
    }
    let last = format!("/admin/users/{}/sessions", u64::MAX);
    assert_eq!(
        api.send(admin(Method::GET, &last), S::OK).await["sessions"],
        json!([])
    );
    let openid = Sandbox::openid_of("alice");
    let unionid = Sandbox::unionid_of("alice");
    let found = api
        .send(
            admin(Method::GET, &format!("/admin/users?openid={openid}")),
            S::OK,
        )
        .await;
    assert_eq!(found["uid"], alice_uid);
    let found = api
        .send(
            admin(Method::GET, &format!("/admin/users?unionid={unionid}")),
            S::OK,
        )
        .await;
    assert_eq!(found["uid"], alice_uid);
    api.send(
        admin(Method::GET, "/admin/users?openid=o-nobody"),
        S::NOT_FOUND,
    )
    .await;
    api.send(
        admin(
            Method::GET,
            &format!("/admin/users?openid={openid}&unionid={unionid}"),
        ),
        S::BAD_REQUEST,
    )
    .await;
    api.send(admin(Method::GET, "/admin/users"), S::BAD_REQUEST)
        .await;
    for query in [
        "openid=".to_owned(),
        "unionid=".to_owned(),
        format!("openid={openid}&openid={openid}"),
        format!("unionid={unionid}&unionid=u-other"),
    ] {
        api.send(
            admin(Method::GET, &format!("/admin/users?{query}")),
            S::BAD_REQUEST,
        )
        .await;
    }
    // Other query parameters are ignored.
    let found = api
        .send(
            admin(Method::GET, &format!("/admin/users?openid={openid}&x=1")),
            S::OK,
        )
        .await;
    assert_eq!(found["uid"], alice_uid);
    api.send(
        get(&format!("/admin/users?openid={openid}")),
        S::UNAUTHORIZED,
    )
    .await;

    // Admin: sessions are listed by the hash of their token, never the token.
    let sessions_path = format!("/admin/users/{alice_uid}/sessions");
    let listed = api.send(admin(Method::GET, &sessions_path), S::OK).await;
    let ids: BTreeSet<&str> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    for token in [&alice_token, &alice_token2, &alice_token3] {
        assert!(
            ids.contains(hex(&Sha256::digest(token.as_bytes())).as_str()),
            "{listed}"
        );
        assert!(
            !listed.to_string().contains(token.as_str()),
            "a token in {listed}"
        );
    }
    let none = api
        .send(admin(Method::GET, "/admin/users/999999/sessions"), S::OK)
        .await;
    assert_eq!(none["sessions"], json!([]));
    api.send(get(&sessions_path), S::UNAUTHORIZED).await;
    let stats = api.send(admin(Method::GET, "/admin/stats"), S::OK).await;
    assert_eq!(stats["users"], 3);
    api.send(get("/admin/stats").bearer_auth("wrong"), S::UNAUTHORIZED)
        .await;

    // Admin: the export, every user as a line of JSON, each line a documented User.
    let exported = api.send(admin(Method::GET, "/admin/export"), S::OK).await;
    let exported = exported.as_str().unwrap();
    assert_eq!(exported.lines().count(), 3, "{exported}");
    let user = json!({ "$ref": "#/components/schemas/User" });
    for line in exported.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        api.validate(&user, &line, "a line of GET /admin/export");
    }
    api.send(get("/admin/export"), S::UNAUTHORIZED).await;

    // Admin: resetting a user's session_key at WeChat.
    let reset = |uid: u64| {
        admin(
            Method::POST,
            &format!("/admin/users/{uid}/session-key/reset"),
        )
    };
    api.send(reset(alice_uid), S::NO_CONTENT).await;
    api.send(verify(&alice_token), S::OK).await;
    api.send(reset(999999), S::NOT_FOUND).await;
    let bob_uid = bob["uid"].as_u64().unwrap();
    assert_eq!(
        api.send(reset(bob_uid), S::CONFLICT).await["error"],
        "session_key_expired"
    );
    api.send(
        post(&format!("/admin/users/{alice_uid}/session-key/reset")),
        S::UNAUTHORIZED,
    )
    .await;

    // Admin: revoking one session, then all of a user's.
    let one = format!(
        "/admin/sessions/{}",
        hex(&Sha256::digest(alice_token2.as_bytes()))
    );
    api.send(admin(Method::DELETE, &one), S::NO_CONTENT).await;
    api.send(
        get("/v1/session").bearer_auth(&alice_token2),
        S::UNAUTHORIZED,
    )
    .await;
    assert_eq!(
        api.send(admin(Method::DELETE, &one), S::NOT_FOUND).await["error"],
        "session_not_found"
    );
    // A session id is 64 lowercase hex digits, as the list gives it.
    for id in [
        "not-an-id".to_owned(),
        "0".repeat(63),
        one[16..].to_uppercase(),
    ] {
        api.send(
            admin(Method::DELETE, &format!("/admin/sessions/{id}")),
            S::BAD_REQUEST,
        )
        .await;
    }
    api.send(tb.http.delete(url(&one)), S::UNAUTHORIZED).await;
    let revoked = api.send(admin(Method::DELETE, &sessions_path), S::OK).await;
    assert_eq!(revoked["revoked"], 2);
    api.send(
        get("/v1/session").bearer_auth(&alice_token),
        S::UNAUTHORIZED,
    )
    .await;
    let revoked = api.send(admin(Method::DELETE, &sessions_path), S::OK).await;
    assert_eq!(revoked["revoked"], 0);
    api.send(tb.http.delete(url(&sessions_path)), S::UNAUTHORIZED)
        .await;

    // Admin: rotating the access-token signing key.
    let rotation = api
        .send(admin(Method::POST, "/admin/keys/rotate"), S::OK)
        .await;
    assert_eq!(rotation["keys"].as_array().unwrap().len(), 2);
    api.send(post("/admin/keys/rotate"), S::UNAUTHORIZED).await;

    // The revocation feed: the logouts and revocations above, as an event stream; each event's
    // data as documented.
    let feed = || get("/v1/revocations").bearer_auth(VERIFIER_TOKEN);
    api.send(get("/v1/revocations"), S::UNAUTHORIZED).await;
    api.send(get("/v1/revocations").bearer_auth("wrong"), S::UNAUTHORIZED)
        .await;
    api.send(
        get("/v1/revocations?since=yesterday").bearer_auth(VERIFIER_TOKEN),
        S::BAD_REQUEST,
    )
    .await;
    let text = api.stream(feed(), "event:synced").await;
    let mut revokes = 0;
    for block in text.split("\n\n").filter(|b| b.contains("event:")) {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(str::to_owned)
        };
        let (event, data) = (field("event").unwrap(), field("data").unwrap());
        let data: Value = serde_json::from_str(&data).unwrap();
        let schema = match event.as_str() {
            "revoke" => "Revocation",
            "reset" => "FeedReset",
            "synced" => continue,
            other => panic!("an undocumented event {other}"),
        };
        revokes += usize::from(event == "revoke");
        let schema = json!({ "$ref": format!("#/components/schemas/{schema}") });
        api.validate(&schema, &data, &format!("a {event} event"));
        let cursor = json!({ "$ref": "#/components/schemas/Cursor" });
        api.validate(&cursor, &Value::from(field("id").unwrap()), "an event id");
    }
    assert!(revokes >= 3, "{text}");
    let since = get("/v1/revocations?since=0-0").bearer_auth(VERIFIER_TOKEN);
    api.stream(since, "event:synced").await;

    let metrics = api.send(get("/metrics"), S::OK).await;
    assert!(metrics.as_str().unwrap().contains("wxbroker_"), "{metrics}");

    // A method a documented path does not take is 405; a path outside the document is 404.
    let concrete = |template: &str| {
        template
            .replace("{uid}", &alice_uid.to_string())
            .replace("{id}", &"0".repeat(64))
    };
    let paths: Vec<(String, Vec<&str>)> = api.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            (
                path.clone(),
                METHODS
                    .into_iter()
                    .filter(|m| item.get(*m).is_none())
                    .collect(),
            )
        })
        .collect();
    // Forward auth takes every method (proxies send the original one), as its description says.
    for (path, missing) in paths.into_iter().filter(|(path, _)| path != "/v1/auth") {
        for method in missing {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            api.send(admin(method, &concrete(&path)), S::METHOD_NOT_ALLOWED)
                .await;
        }
    }
    // HEAD wherever GET is served: GET's status and headers without the body (load balancers
    // probe /healthz with it); elsewhere 405. OPTIONS on every path: 204 and Allow.
    let paths: Vec<(String, bool)> = api.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| (path.clone(), item.get("get").is_some()))
        .collect();
    for (path, has_get) in paths {
        let mut concrete = concrete(&path);
        if path == "/admin/users" {
            concrete.push_str(&format!("?openid={openid}"));
        }
        let with_credentials = |method: Method| {
            let request = tb.http.request(method, url(&concrete));
            match path.split('/').nth(1) {
                Some("admin") => request.bearer_auth(ADMIN_TOKEN),
                _ if path == "/v1/revocations" => request.bearer_auth(VERIFIER_TOKEN),
                Some("v1") => request.bearer_auth(&bob_token),
                _ => request,
            }
        };
        if path == "/v1/auth" {
            // Forward auth answers every method as a check, OPTIONS too (a proxy may send the
            // original request's): 200 with the user for a live session, as its description says.
            let got = with_credentials(Method::OPTIONS).send().await.unwrap();
            assert_eq!(got.status(), S::OK, "OPTIONS /v1/auth");
            assert!(got.headers().contains_key("x-wx-uid"), "OPTIONS /v1/auth");
        } else {
            api.send(with_credentials(Method::OPTIONS), S::NO_CONTENT)
                .await;
        }
        if !has_get {
            api.send(with_credentials(Method::HEAD), S::METHOD_NOT_ALLOWED)
                .await;
            continue;
        }
        let got = with_credentials(Method::GET).send().await.unwrap();
        let (status, media) = (got.status(), got.headers().get(CONTENT_TYPE).cloned());
        assert!(status.is_success(), "GET {concrete}: {status}");
        let (_, headers) = api.exchange(with_credentials(Method::HEAD), status).await;
        assert_eq!(headers.get(CONTENT_TYPE), media.as_ref(), "HEAD {concrete}");
    }
    let undocumented = [
        "/",
        "/v1",
        "/v1/",
        "/v1//login",
        "/v1/login/x",
        "/v1/login//",
        "/v2/login",
        "/v1/sessions",
        "/healthz//",
        "/openapi.yaml",
        "/openapi",
        "/metrics/x",
        "/admin",
        "/admin/",
        "/admin/users/1/x",
        "/admin/user/1",
        "/admin/sessions",
        "/admin/stats/x",
        "/sandbox/userinfo",
    ];
    for path in undocumented {
        assert!(api.template(path).is_none(), "{path} is documented");
        for method in [Method::GET, Method::POST, Method::DELETE] {
            api.send(admin(method, path), S::NOT_FOUND).await;
        }
    }
    // One trailing slash is the same route, answering as documented.
    api.send(get("/healthz/"), S::OK).await;
    api.send(get("/v1/login/"), S::METHOD_NOT_ALLOWED).await;

    // The admin routes are off without an admin token: 404 whatever is sent...
    let off = TestBroker::start_with(|c| c.access_token_ttl = 0).await;
    assert_eq!(
        Api::fetch(&off).await.doc,
        api.doc,
        "every broker serves the same document"
    );
    let admin_paths: Vec<(String, String)> = api
        .operations()
        .into_iter()
        .filter(|(p, _)| p.starts_with("/admin/"))
        .collect();
    for (path, method) in admin_paths {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let request = off
            .http
            .request(method, format!("{}{}", off.url, concrete(&path)));
        let body = api
            .send(request.bearer_auth(ADMIN_TOKEN), S::NOT_FOUND)
            .await;
        assert_eq!(body["error"], "not_found");
    }
    // Even with an Authorization header that is not visible ASCII.
    let stats = off.http.get(format!("{}/admin/stats", off.url));
    api.send(stats.header(AUTHORIZATION, garbled.clone()), S::NOT_FOUND)
        .await;
    // ...and so are signed access tokens, their keys and the feed while the tokens are off.
    let off_url = |path: &str| format!("{}{path}", off.url);
    let off_login = api
        .send(
            off.http
                .post(off_url("/v1/login"))
                .json(&json!({ "code": "dan.1" })),
            S::OK,
        )
        .await;
    assert!(off_login.get("accessToken").is_none(), "{off_login}");
    let off_session = off_login["thirdSession"].as_str().unwrap();
    for request in [
        off.http.post(off_url("/v1/token")).bearer_auth(off_session),
        off.http.get(off_url("/.well-known/jwks.json")),
        off.http
            .get(off_url("/v1/revocations"))
            .bearer_auth(VERIFIER_TOKEN),
    ] {
        assert_eq!(api.send(request, S::NOT_FOUND).await["error"], "not_found");
    }

    // A silent WeChat is 504; a stuck actor is 503 (with the fault hooks compiled in).
    let (upstream, _) = fault_upstream().await;
    let faulty = TestBroker::start_with(|c| {
        c.api_base = upstream.parse().unwrap();
        c.upstream_timeout_ms = 300;
        c.call_timeout_ms = 300;
    })
    .await;
    let faulty_login = |code: &str| {
        faulty
            .http
            .post(format!("{}/v1/login", faulty.url))
            .json(&json!({ "code": code }))
    };
    api.send(faulty_login("hang.1"), S::GATEWAY_TIMEOUT).await;
    api.send(faulty_login("http500.1"), S::BAD_GATEWAY).await;
    #[cfg(feature = "fault-injection")]
    {
        let fine = api.send(faulty_login("fine.1"), S::OK).await;
        let token = fine["thirdSession"].as_str().unwrap();
        let stall = wxbroker::Fault::Stall(std::time::Duration::from_millis(1000));
        faulty
            .broker
            .inject(wxbroker::ActorKind::SessionKeeper, stall);
        faulty
            .broker
            .inject(wxbroker::ActorKind::UserRegistry, stall);
        let request = |method: Method, path: &str| {
            faulty
                .http
                .request(method, format!("{}{path}", faulty.url))
                .bearer_auth(token)
        };
        // A check is answered from the keeper's table even while the keeper is stuck.
        api.send(request(Method::GET, "/v1/session"), S::OK).await;
        api.send(request(Method::GET, "/v1/me"), S::SERVICE_UNAVAILABLE)
            .await;
        api.send(request(Method::POST, "/v1/logout"), S::SERVICE_UNAVAILABLE)
            .await;
    }

    // Not ready: the routes of a broker that has shut down, served on a listener of their own
    // (the broker's own server stops serving when the broker stops).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        warp::serve(wxbroker::routes(off.broker.clone()))
            .incoming(listener)
            .run(),
    );
    off.broker.shutdown().await.unwrap();
    for path in ["/healthz", "/readyz"] {
        let body = api
            .send(
                off.http.get(format!("{base}{path}")),
                S::SERVICE_UNAVAILABLE,
            )
            .await;
        assert_eq!(body["error"], "not_ready");
    }

    let missed: Vec<String> = api
        .operations()
        .difference(&api.exercised)
        .map(|(path, method)| format!("{} {path}", method.to_uppercase()))
        .collect();
    assert!(
        missed.is_empty(),
        "documented but never exercised: {missed:?}"
    );
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
