"""HTTP security without a gateway: keys, tokens, permissions, limits, the middleware."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.jwt_tokens import (  # noqa: E402
    AUDIENCE,
    ISSUER,
    SigningKey,
    hs256_with_public_key,
    unsigned_token,
)

from dicomgate.config import parse_config  # noqa: E402
from dicomgate.errors import ConfigError  # noqa: E402
from dicomgate.observability.logging import JsonFormatter, TextFormatter  # noqa: E402
from dicomgate.security.http_auth import (  # noqa: E402
    Access,
    ApiKeyStore,
    AuthMiddleware,
    hash_api_key,
    new_api_key,
    presented_credential,
    required_access,
)
from dicomgate.security.http_models import ApiKeyConfig, JwtConfig, Permission  # noqa: E402
from dicomgate.security.ip_filter import IpAllowList, IpFilterMiddleware  # noqa: E402
from dicomgate.security.limits import (  # noqa: E402
    BodyLimitMiddleware,
    RateLimitMiddleware,
    TokenBuckets,
)
from dicomgate.security.oidc import (  # noqa: E402
    JwksCache,
    JwtVerifier,
    KeysUnavailable,
    TokenRejected,
    granted_scopes,
    parse_jwks,
)

KEY1 = SigningKey.rsa("k1")
KEY2 = SigningKey.rsa("k2")
EC_KEY = SigningKey.ec("e1")


# -- API keys and permissions ---------------------------------------------------------


def test_new_api_keys_are_random_and_hash_to_64_hex() -> None:
    a, b = new_api_key(), new_api_key()
    assert a != b and a.startswith("dgk_") and len(a) >= 40
    assert len(hash_api_key(a)) == 64 and int(hash_api_key(a), 16) >= 0


def test_api_key_store_finds_only_the_right_key() -> None:
    viewer, uploader = new_api_key(), new_api_key()
    store = ApiKeyStore(
        [
            ApiKeyConfig(name="viewer", sha256=hash_api_key(viewer).upper(), scopes=["read"]),
            ApiKeyConfig(name="up", sha256=hash_api_key(uploader), scopes=["read", "write"]),
        ]
    )
    found = store.lookup(viewer)
    assert found is not None and found.name == "viewer"
    assert found.permissions == {Permission.READ}
    up = store.lookup(uploader)
    assert up is not None and up.permissions == {Permission.READ, Permission.WRITE}
    assert store.lookup(viewer + "x") is None
    assert store.lookup("") is None


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/healthz", Access.OPEN),
        ("GET", "/readyz", Access.OPEN),
        ("GET", "/metrics", Access.OPEN),
        ("GET", "/dicomweb/studies", Permission.READ),
        ("GET", "/dicomweb/wado", Permission.READ),
        ("HEAD", "/dicomweb/studies/1.2/series", Permission.READ),
        ("POST", "/dicomweb/studies", Permission.WRITE),
        ("POST", "/dicomweb/studies/1.2.3", Permission.WRITE),
        ("DELETE", "/dicomweb/studies/1.2.3", Permission.WRITE),
        ("GET", "/fhir/ImagingStudy", Permission.READ),
        ("GET", "/api/queue", Permission.ADMIN),
        ("POST", "/api/queue/1/retry", Permission.ADMIN),
        ("GET", "/api/docs", Permission.ADMIN),
        ("GET", "/", Permission.ADMIN),
        ("GET", "/healthz/", Permission.ADMIN),  # not the open path: unknown is not open
        ("GET", "/dicomwebx", Permission.ADMIN),
        ("GET", "/ui", Permission.READ),  # the console: read, admin for queue and audit
        ("GET", "/ui/index.html", Permission.READ),
        ("POST", "/ui/routes/dry-run", Permission.READ),
        ("POST", "/ui/queue/7/retry", Permission.ADMIN),
        ("GET", "/ui/audit", Permission.ADMIN),
        ("GET", "/ui/login", Access.OPEN),
        ("GET", "/ui/static/console.css", Access.OPEN),
        ("GET", "/uix", Permission.ADMIN),
    ],
)
def test_required_access_per_path(method: str, path: str, expected: Any) -> None:
    assert required_access(method, path) == expected


def test_protected_metrics_need_any_credential() -> None:
    assert required_access("GET", "/metrics", protect_metrics=True) is Access.AUTHENTICATED


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"authorization", b"Bearer abc")], ("abc", "bearer")),
        ([(b"authorization", b"bearer  abc ")], ("abc", "bearer")),
        ([(b"authorization", b"Basic dXNlcjpwdw==")], ("pw", "basic")),  # user:pw
        ([(b"authorization", b"basic  OnB3 ")], ("pw", "basic")),  # :pw, no user name
        ([(b"authorization", b"Basic dTpwOnc=")], ("p:w", "basic")),  # u:p:w
        ([(b"authorization", b"Basic dXNlcg==")], ("", "basic")),  # "user": no colon
        ([(b"authorization", b"Basic dXNlcjo=")], ("", "basic")),  # "user:": no password
        ([(b"authorization", b"Basic not base64!")], ("", "basic")),
        ([(b"authorization", b"Basic dXNlcjpwdw")], ("", "basic")),  # padding missing
        ([(b"authorization", b"Basic dTr/")], ("", "basic")),  # "u:\xff": not UTF-8
        ([(b"authorization", b"Digest username=u")], ("", "other")),
        ([(b"x-api-key", b"k")], ("k", "x-api-key")),
        ([(b"authorization", b"Bearer a"), (b"x-api-key", b"b")], ("a", "bearer")),
    ],
)
def test_presented_credential(
    headers: list[tuple[bytes, bytes]], expected: tuple[str, str] | None
) -> None:
    presented = presented_credential({"type": "http", "headers": headers})
    assert (presented and (presented.value, presented.scheme)) == expected


# -- configuration ----------------------------------------------------------------------


def _http(http: dict[str, Any]) -> Any:
    return parse_config({"http": http}, environ={}).http


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ({"auth": {}}, "http.auth: give api_keys or jwt"),
        ({"auth": {"api_keys": [{"name": "a", "sha256": "abc"}]}}, "64 hexadecimal digits"),
        ({"auth": {"jwt": {"issuer": "i", "audience": "a"}}}, "give jwks_url or public_keys"),
        (
            {"auth": {"jwt": {"issuer": "i", "audience": "a", "jwks_url": "x", "algorithms": []}}},
            "http.auth.jwt",
        ),
        (
            {
                "auth": {
                    "jwt": {
                        "issuer": "i",
                        "audience": "a",
                        "jwks_url": "https://idp/jwks",
                        "algorithms": ["RS256", "HS256"],
                    }
                }
            },
            "'HS256' is not accepted",
        ),
        (
            {
                "auth": {
                    "jwt": {
                        "issuer": "i",
                        "audience": "a",
                        "jwks_url": "https://idp/jwks",
                        "algorithms": ["none"],
                    }
                }
            },
            "'none' is not accepted",
        ),
        ({"allowed_ips": ["10.0.0.0/33"]}, "http.allowed_ips: '10.0.0.0/33' is not"),
        ({"trusted_proxies": ["proxy"]}, "http.trusted_proxies"),
        ({"tls": {"cert": "a.pem"}}, "http.tls.key: required key is missing"),
        ({"limits": {"max_bodybytes": 1}}, "http.limits.max_bodybytes: unknown key"),
    ],
)
def test_bad_http_security_config_names_the_key(http: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _http(http)
    assert message in str(info.value)


def test_good_http_security_config() -> None:
    key = hash_api_key(new_api_key())
    http = _http(
        {
            "tls": {"cert": "s.pem", "key": "s.key", "min_version": 1.3},
            "auth": {
                "api_keys": [{"name": "viewer", "sha256": key}],
                "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": "https://i/j"},
            },
            "allowed_ips": ["10.0.0.0/8", "192.168.1.7", "fd00::/8"],
        }
    )
    assert http.tls.min_version == "1.3"
    assert http.auth.api_keys[0].scopes == [Permission.READ]  # least privilege by default
    assert "HS256" not in http.auth.jwt.algorithms


# -- JWT ----------------------------------------------------------------------------------


class FakeIdp:
    """A JWKS 'server' in memory, with a clock, that can fail."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = keys
        self.fetches = 0
        self.down = False
        self.now = 1000.0

    async def fetch(self) -> Any:
        self.fetches += 1
        if self.down:
            raise httpx.ConnectError("down")
        return {"keys": [k.jwk() for k in self.keys]}

    def clock(self) -> float:
        return self.now


def _verifier(idp: FakeIdp, **overrides: Any) -> JwtVerifier:
    config = JwtConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url="https://idp.test/jwks",
        **overrides,
    )
    return JwtVerifier(config, fetch=idp.fetch, clock=idp.clock)


def _verify(verifier: JwtVerifier, token: str) -> Any:
    return asyncio.run(verifier.verify(token))


def _reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as info:
        _verify(verifier, token)
    return info.value.reason


def test_only_the_valid_token_passes() -> None:
    idp = FakeIdp([KEY1])
    verifier = _verifier(idp)
    identity = _verify(verifier, KEY1.token())
    assert identity.subject == "user-42" and identity.permissions == {Permission.READ}
    now = int(time.time())
    cases = {
        "expired": KEY1.token(exp=now - 120, nbf=now - 600, iat=now - 600),
        "wrong_audience": KEY1.token(aud="someone-else"),
        "wrong_issuer": KEY1.token(iss="https://evil.test"),
        "unknown_key": KEY2.token(),
        "algorithm_not_allowed": unsigned_token(),
        "not_yet_valid": KEY1.token(nbf=now + 600),
        "missing_claim": KEY1.token(exp=None),
    }
    for expected, token in cases.items():
        assert _reason(verifier, token) == expected, expected
    assert _reason(verifier, hs256_with_public_key(KEY1)) == "algorithm_not_allowed"
    assert _reason(verifier, "not.a.token") == "malformed"
    # A token signed by another key but naming KEY1's kid fails its signature check.
    forged = KEY2.token(kid="k1")
    assert _reason(verifier, forged) == "bad_signature"


def test_leeway_tolerates_small_clock_differences() -> None:
    verifier = _verifier(FakeIdp([KEY1]), leeway=30)
    now = int(time.time())
    assert _verify(verifier, KEY1.token(exp=now - 10)).subject == "user-42"
    assert _reason(verifier, KEY1.token(exp=now - 60)) == "expired"


def test_algorithm_must_fit_the_key() -> None:
    idp = FakeIdp([KEY1, EC_KEY])
    verifier = _verifier(idp)
    assert _verify(verifier, EC_KEY.token()).subject == "user-42"
    assert _verify(verifier, KEY1.token(alg="PS256")).subject == "user-42"
    # An ES256 header naming the RSA key: no key of that kid can make ES256.
    assert _reason(verifier, EC_KEY.token(kid="k1")) == "unknown_key"
    only_rs256 = _verifier(FakeIdp([KEY1]), algorithms=["RS256"])
    assert _reason(only_rs256, KEY1.token(alg="PS256")) == "algorithm_not_allowed"


def test_token_without_kid_tries_every_key() -> None:
    verifier = _verifier(FakeIdp([KEY2, KEY1]))
    assert _verify(verifier, KEY1.token(kid=None)).subject == "user-42"


def test_unknown_kid_refreshes_the_key_set_rate_limited() -> None:
    idp = FakeIdp([KEY1])
    verifier = _verifier(idp, jwks_min_refresh_seconds=10)
    _verify(verifier, KEY1.token())
    assert idp.fetches == 1
    idp.keys = [KEY1, KEY2]  # the provider rotates in a new key
    idp.now += 11
    assert _verify(verifier, KEY2.token()).subject == "user-42"
    assert idp.fetches == 2
    forged = SigningKey.rsa("k3")
    for _ in range(5):  # forged kids cannot make us hammer the provider
        assert _reason(verifier, forged.token()) == "unknown_key"
    assert idp.fetches == 2
    idp.now += 11
    assert _reason(verifier, forged.token()) == "unknown_key"
    assert idp.fetches == 3


def test_key_set_expires_and_survives_an_outage() -> None:
    idp = FakeIdp([KEY1])
    verifier = _verifier(idp, jwks_cache_seconds=60)
    _verify(verifier, KEY1.token())
    idp.now += 61
    idp.down = True
    assert _verify(verifier, KEY1.token()).subject == "user-42"  # stale keys kept
    assert idp.fetches == 2
    fresh = _verifier(FakeIdp([KEY1]))
    fresh.jwks._fetch = idp.fetch  # type: ignore[union-attr]
    with pytest.raises(KeysUnavailable):
        _verify(fresh, KEY1.token())


def test_static_public_keys(tmp_path: Path) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(KEY1.public_pem)
    config = JwtConfig(issuer=ISSUER, audience=AUDIENCE, public_keys=[pem])
    verifier = JwtVerifier(config)
    assert _verify(verifier, KEY1.token(kid=None)).subject == "user-42"
    assert _reason(verifier, KEY2.token()) == "bad_signature"
    assert _reason(verifier, hs256_with_public_key(KEY1)) == "algorithm_not_allowed"


def test_jwks_parsing_skips_secrets_and_encryption_keys() -> None:
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**KEY1.jwk(), "use": "enc"},
            {**KEY2.jwk(), "alg": "PS256"},
            {"kty": "RSA", "kid": "broken"},
            EC_KEY.jwk(),
        ]
    }
    keys = {k.kid: k.algorithms for k in parse_jwks(doc)}
    assert keys == {"k2": {"PS256"}, "e1": {"ES256"}}
    with pytest.raises(ValueError):
        parse_jwks({"not": "a key set"})


def test_scopes_and_roles_map_to_permissions() -> None:
    claims = {
        "scp": "dicom.read",
        "roles": ["Gateway.Admin", 3],
        "realm_access": {"roles": ["uploader"]},
    }
    names = ["scope", "scp", "roles", "realm_access.roles"]
    assert granted_scopes(claims, names) == {"dicom.read", "Gateway.Admin", "uploader"}
    verifier = _verifier(
        FakeIdp([KEY1]),
        scope_claims=names,
        permissions={"read": ["dicom.read"], "write": ["uploader"], "admin": ["Gateway.Admin"]},
    )
    identity = _verify(verifier, KEY1.token(scope=None, **claims))
    assert identity.permissions == {Permission.READ, Permission.WRITE, Permission.ADMIN}
    identity = _verify(verifier, KEY1.token(scope="read write admin"))
    assert identity.permissions == frozenset()


def test_jwks_cache_shares_one_fetch_between_concurrent_requests() -> None:
    idp = FakeIdp([KEY1])
    cache = JwksCache(idp.fetch, ttl=60, min_refresh=10, clock=idp.clock)

    async def many() -> None:
        await asyncio.gather(*(cache.keys() for _ in range(20)))

    asyncio.run(many())
    assert idp.fetches == 1


# -- rate limits and IP allow-list ------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # per client
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    now[0] += 100
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # never more than burst
    assert buckets.take("a") > 0


def test_ip_allow_list() -> None:
    allowed = IpAllowList(["10.0.0.0/8", "192.168.1.7", "fd00::/8"])
    assert allowed.allows("10.1.2.3")
    assert allowed.allows("192.168.1.7") and not allowed.allows("192.168.1.8")
    assert allowed.allows("::ffff:10.0.0.1")  # IPv4 client seen by a dual-stack listener
    assert allowed.allows("fd00::1") and not allowed.allows("fe80::1%eth0")
    assert not allowed.allows("127.0.0.1")
    assert not allowed.allows("") and not allowed.allows("garbage")


# -- the middleware, in process -----------------------------------------------------------

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers its size (and who the caller was)."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OSError("client gone")
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    principal = scope.get("state", {}).get("principal", "")
    body = f"{size} {principal}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _request(app: Asgi, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _auth_app(keys: dict[str, list[str]]) -> tuple[Asgi, dict[str, str]]:
    issued = {name: new_api_key() for name in keys}
    store = ApiKeyStore(
        [
            ApiKeyConfig(name=name, sha256=hash_api_key(issued[name]), scopes=scopes)
            for name, scopes in keys.items()
        ]
    )
    return AuthMiddleware(_echo_app, store), issued


def test_auth_middleware_answers() -> None:
    app, keys = _auth_app({"viewer": ["read"], "admin": ["admin"]})
    assert _request(app, "GET", "/healthz").status_code == 200
    missing = _request(app, "GET", "/dicomweb/studies")
    assert missing.status_code == 401
    assert missing.json() == {"error": "authentication required"}
    assert missing.headers["www-authenticate"] == 'Bearer realm="dicomgate"'
    wrong = _request(app, "GET", "/dicomweb/studies", headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
    ok = _request(
        app, "GET", "/dicomweb/studies", headers={"authorization": f"Bearer {keys['viewer']}"}
    )
    assert ok.status_code == 200 and ok.text == "0 viewer"
    denied = _request(
        app, "POST", "/dicomweb/studies", headers={"x-api-key": keys["viewer"]}, content=b"x"
    )
    assert denied.status_code == 403 and denied.json() == {"error": "forbidden"}
    assert denied.headers["connection"] == "close"  # its body is left unread
    assert _request(app, "GET", "/api/queue", headers={"x-api-key": keys["admin"]}).is_success
    assert (
        _request(app, "GET", "/api/queue", headers={"x-api-key": keys["viewer"]}).status_code == 403
    )


def test_denials_are_logged_without_the_credential(caplog: pytest.LogCaptureFixture) -> None:
    app, keys = _auth_app({"viewer": ["read"]})
    secret = "dgk_this-is-not-a-valid-key"
    with caplog.at_level("WARNING", logger="dicomgate.security"):
        _request(app, "GET", "/dicomweb/studies/1.2.3", headers={"x-api-key": secret})
        _request(app, "POST", "/dicomweb/studies", headers={"x-api-key": keys["viewer"]})
    records = [r for r in caplog.records if getattr(r, "event", "") == "auth.denied"]
    assert [(r.status, r.reason) for r in records] == [  # type: ignore[attr-defined]
        (401, "invalid_api_key"),
        (403, "permission_missing"),
    ]
    assert records[0].client_ip == "10.0.0.9"  # type: ignore[attr-defined]
    assert records[1].actor == "viewer"  # type: ignore[attr-defined]
    formatters = (JsonFormatter(), TextFormatter())
    text = caplog.text + " ".join(f.format(r) for r in records for f in formatters)
    assert secret not in text and keys["viewer"] not in text
    assert "1.2.3" not in text  # the path's UIDs are not logged, only its area
    assert "area=dicomweb" in text
    # The whole path travels to the audit trail only.
    assert records[0].audit_path == "/dicomweb/studies/1.2.3"  # type: ignore[attr-defined]


def test_ip_filter_middleware() -> None:
    app = IpFilterMiddleware(_echo_app, IpAllowList(["192.168.0.0/16"]))
    response = _request(app, "GET", "/healthz")
    assert response.status_code == 403 and response.json() == {"error": "forbidden"}
    allowed = IpFilterMiddleware(_echo_app, IpAllowList(["10.0.0.0/8"]))
    assert _request(allowed, "GET", "/healthz").status_code == 200


def test_rate_limit_middleware() -> None:
    app = RateLimitMiddleware(_echo_app, TokenBuckets(rate=0.5, burst=2))
    codes = [_request(app, "GET", "/dicomweb/studies").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = _request(app, "GET", "/dicomweb/studies")
    assert limited.headers["retry-after"] in ("1", "2")
    assert limited.json() == {"error": "too many requests"}


def test_body_limit_declared_and_streamed() -> None:
    app = BodyLimitMiddleware(_echo_app, max_body_bytes=10, max_stow_bytes=100, body_timeout=5)
    assert _request(app, "POST", "/api/queue/1/retry", content=b"x" * 10).text.startswith("10")
    too_big = _request(app, "POST", "/api/queue/1/retry", content=b"x" * 11)
    assert too_big.status_code == 413 and too_big.json() == {"error": "request body too large"}
    assert _request(app, "POST", "/dicomweb/studies", content=b"x" * 100).status_code == 200

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 10

    streamed = _request(app, "POST", "/dicomweb/studies", content=chunks())  # chunked
    assert streamed.status_code == 413
    assert streamed.headers["connection"] == "close"


def test_stalled_body_times_out() -> None:
    app = BodyLimitMiddleware(_echo_app, max_body_bytes=0, max_stow_bytes=0, body_timeout=0.2)

    async def stall() -> AsyncIterator[bytes]:
        yield b"start"
        await asyncio.sleep(2)
        yield b"never"

    started = time.monotonic()
    response = _request(app, "POST", "/dicomweb/studies", content=stall())
    assert response.status_code == 408
    assert time.monotonic() - started < 2
