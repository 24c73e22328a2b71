"""Schemathesis hooks for tests/integration/fuzz.rs: the credentials of each request, and codes
the sandbox accepts.

The admin routes get the admin token. The session routes get a live session: a token from a login
of the sandbox user `fuzzer`, replaced by a new login every second, so that a token the run itself
ended (a logout, a revocation of the user's sessions by uid) is not used for long. A token that a
stateful step took from an earlier answer through an OpenAPI link (login -> session -> logout) is
left as it is, so that the step tests that very session, refused after its logout included.

(Credentials come from here rather than from `[auth.openapi.*]` in schemathesis.toml: a session
token there is one fixed token, dead for the rest of the run after the first logout; and
schemathesis ignores hooks' credentials when the file configures any.)
"""

import itertools
import os
import re
import threading

import requests
import schemathesis

BROKER = os.environ["WXBROKER_FUZZ_URL"]
ADMIN_TOKEN = os.environ["WXBROKER_FUZZ_ADMIN_TOKEN"]
SESSION_TOKEN = re.compile(r"^Bearer [A-Za-z0-9_-]{43}$")
# The mini programs of the sandbox the broker runs on (src/sandbox.rs).
SANDBOX_APPS = ("wxsandbox0000000", "wxsandbox0000001")

# Codes are used once, by WeChat's rule: a run's codes carry a nonce of their own.
_run = os.urandom(4).hex()
_codes = itertools.count(1)
_lock = threading.Lock()
_minted = set()


@schemathesis.auth(refresh_interval=None).apply_to(path_regex=r"^/admin/")
class Admin:
    """The admin token the broker was started with."""

    def get(self, case, context):
        return ADMIN_TOKEN

    def set(self, case, data, context):
        case.headers["Authorization"] = f"Bearer {data}"


# No replay on a 401: that answer is right for a linked token the flow ended.
@schemathesis.auth(refresh_interval=1, retry_on=[]).apply_to(
    path_regex=r"^/v1/(session|logout|userinfo|phone|me)$"
)
class Session:
    """A session of the sandbox user `fuzzer`, from a fresh login code each time."""

    def get(self, case, context):
        with _lock:
            code = f"fuzzer.{_run}.{next(_codes)}"
        reply = requests.post(f"{BROKER}/v1/login", json={"code": code}, timeout=30)
        reply.raise_for_status()
        token = reply.json()["thirdSession"]
        with _lock:
            _minted.add(token)
        return token

    def set(self, case, data, context):
        given = case.headers.get("Authorization", "")
        with _lock:
            linked = SESSION_TOKEN.match(given) and given[len("Bearer ") :] not in _minted
        if not linked:
            case.headers["Authorization"] = f"Bearer {data}"


@schemathesis.hook
def map_case(context, case):
    """Half the well-formed login and phone codes of the fuzzing and stateful phases become codes
    the sandbox accepts (its grammar in src/sandbox.rs): `userK.N` logs in as one of five users,
    `DIGITS.N` is a phone-number code, so that flows start from real sessions and real users. The
    other half, and every code of the coverage phase and of malformed requests, stay as generated.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    # An appid the document allows but the broker does not serve is 400 unknown_app: which apps a
    # deployment serves, only it knows. A well-formed login names one of the sandbox's two.
    if case.operation.path == "/v1/login" and isinstance(case.body, dict) and "appid" in case.body:
        with _lock:
            n = next(_codes)
        case.body["appid"] = SANDBOX_APPS[n % 2]
    if meta.phase.name not in ("fuzzing", "stateful") or not isinstance(case.body, dict):
        return case
    if not isinstance(case.body.get("code"), str):
        return case
    with _lock:
        n = next(_codes)
    if n % 2:
        return case
    if case.operation.path == "/v1/login":
        case.body["code"] = f"user{n % 5}{'.union' if n % 3 == 0 else ''}.{_run}.{n}"
    elif case.operation.path == "/v1/phone":
        case.body["code"] = f"1380013{n % 10000:04}.{_run}.{n}"
    return case
