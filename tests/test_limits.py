"""The edges of the API: rate limits, CORS, and the JSON answers for unknown routes and methods."""

from __future__ import annotations

import time

import pytest

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, Api

ALLOWED = "http://allowed.example"
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")



# -- rate limits ----------------------------------------------------------------


async def test_every_response_carries_the_rate_limit_headers_and_the_sixth_is_429(make_client):
    api = Api(await make_client(rate_limit=5))
    requests = [
        ("GET", "/api/health", {}, 200),
        ("GET", "/api/jobs/list", {}, 401),
        ("GET", "/api/no-such-route", {}, 404),
        ("POST", "/api/auth/login", {"json": {"email": ADMIN_EMAIL}}, 400),
        ("POST", "/api/auth/login", {"json": {"email": ADMIN_EMAIL, "password": "wrong"}}, 401),
    ]

    remaining = []
    for method, path, kwargs, expected in requests:
        now = time.time()
        response = await api.call(method, path, **kwargs)
        assert response.status == expected, (path, await response.text())
        assert all(h in response.headers for h in RATE_HEADERS), (path, dict(response.headers))
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert now <= int(response.headers["X-RateLimit-Reset"]) <= now + 61
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    refused = await api.call("GET", "/api/health")

    assert remaining == [4, 3, 2, 1, 0]
    assert refused.status == 429
    body = await refused.json()
    assert (body["error"], body["message"]) == ("Too Many Requests", "Rate limit exceeded")
    assert type(body["retryAfter"]) is int and 1 <= body["retryAfter"] <= 12  # one token per 12 s at 5/min
    assert refused.headers["Retry-After"] == str(body["retryAfter"])
    assert (refused.headers["X-RateLimit-Limit"], refused.headers["X-RateLimit-Remaining"]) == ("5", "0")
    assert "X-RateLimit-Reset" in refused.headers


async def test_a_refused_request_does_nothing(make_client):
    api = Api(await make_client(rate_limit=5))
    admin = await api.admin()
    api.forget_cookies()
    for _ in range(5):
        await api.call("GET", "/api/jobs/list", token=admin)

    refused = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "id"})

    assert refused.status == 429
    assert "jobId" not in await refused.json()
    relaxed = Api(await make_client())  # the same data dir, limits off
    listing = await relaxed.call("GET", "/api/jobs/list", token=admin)
    assert (await listing.json())["total"] == 0


async def test_a_spoofed_x_forwarded_for_does_not_reset_the_bucket(make_client):
    api = Api(await make_client(rate_limit=5))
    for _ in range(5):
        assert (await api.call("GET", "/api/health")).status == 200

    spoofed = [await api.call("GET", "/api/health", headers={"X-Forwarded-For": f"203.0.113.{n}"})
               for n in range(1, 4)]
    spoofed.append(await api.call("GET", "/api/health", headers={"X-Real-IP": "203.0.113.9"}))

    assert [r.status for r in spoofed] == [429] * 4


async def test_x_forwarded_for_counts_from_a_configured_trusted_proxy(make_client):
    """The other side of the spoofing test: behind a real proxy each client has its own bucket."""
    api = Api(await make_client(rate_limit=5, trusted_proxies="127.0.0.1"))
    first = {"X-Forwarded-For": "203.0.113.1"}
    for _ in range(5):
        assert (await api.call("GET", "/api/health", headers=first)).status == 200

    assert (await api.call("GET", "/api/health", headers=first)).status == 429
    assert (await api.call("GET", "/api/health", headers={"X-Forwarded-For": "203.0.113.2"})).status == 200


async def test_each_user_has_its_own_bucket(make_client):
    setup = Api(await make_client())  # tokens from an unlimited app on the same data dir
    user, _ = await setup.new_user()
    admin = await setup.admin()
    api = Api(await make_client(rate_limit=5))

    admin_statuses = [(await api.call("GET", "/api/jobs/list", token=admin)).status for _ in range(6)]
    user_statuses = [(await api.call("GET", "/api/jobs/list", token=user)).status for _ in range(5)]
    anonymous = await api.call("GET", "/api/health")

    assert admin_statuses == [200] * 5 + [429]
    assert user_statuses == [200] * 5
    assert anonymous.status == 200
    assert (await api.call("GET", "/api/jobs/list", token=user)).status == 429


async def test_logging_in_again_does_not_reset_a_users_bucket(make_client):
    api = Api(await make_client(rate_limit=5))
    first = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    for _ in range(5):
        await api.call("GET", "/api/jobs/list", token=first)
    assert (await api.call("GET", "/api/jobs/list", token=first)).status == 429

    second = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()

    assert (await api.call("GET", "/api/jobs/list", token=second)).status == 429


async def test_limit_zero_turns_limiting_off(api):
    for _ in range(150):  # past the contract's 100 a minute
        response = await api.call("GET", "/api/health")
        assert response.status == 200
    assert "X-RateLimit-Limit" not in response.headers


# -- CORS -----------------------------------------------------------------------


def preflight_headers(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}


async def test_preflight_from_a_listed_origin_is_answered_with_credentials(make_client):
    api = Api(await make_client(cors_origins=ALLOWED))

    response = await api.call("OPTIONS", "/api/jobs/submit", headers=preflight_headers(ALLOWED))

    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed_headers = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers


async def test_a_request_from_a_listed_origin_gets_cors_headers(make_client):
    api = Api(await make_client(cors_origins=f"http://other.example, {ALLOWED}"))
    admin = await api.admin()

    response = await api.call("GET", "/api/jobs/list", token=admin, headers={"Origin": ALLOWED})

    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://allowed.example.evil.example",
                                    "https://allowed.example", "null"])
async def test_an_unlisted_origin_gets_no_cors_headers(make_client, origin):
    api = Api(await make_client(cors_origins=ALLOWED))
    admin = await api.admin()

    preflight = await api.call("OPTIONS", "/api/jobs/submit", headers=preflight_headers(origin))
    simple = await api.call("GET", "/api/jobs/list", token=admin, headers={"Origin": origin})

    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    assert preflight.status >= 400
    assert simple.status == 200
    assert "Access-Control-Allow-Origin" not in simple.headers


@pytest.mark.parametrize("origin", [ALLOWED, "http://evil.example"])
async def test_without_configured_origins_no_origin_gets_cors_headers(api, origin):
    admin = await api.admin()

    preflight = await api.call("OPTIONS", "/api/jobs/submit", headers=preflight_headers(origin))
    simple = await api.call("GET", "/api/jobs/list", token=admin, headers={"Origin": origin})

    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Origin" not in simple.headers
    assert simple.status == 200


async def test_cookie_posts_are_accepted_from_a_listed_origin_only(make_client):
    api = Api(await make_client(cors_origins=ALLOWED))
    await api.admin()  # the cookie

    listed = await api.call("POST", "/api/jobs/submit", json={"command": "id"}, headers={"Origin": ALLOWED})
    unlisted = await api.call("POST", "/api/jobs/submit", json={"command": "id"},
                              headers={"Origin": "http://evil.example"})

    assert (listed.status, unlisted.status) == (201, 403)


# -- unknown routes and methods -------------------------------------------------


@pytest.mark.parametrize("path", ["/api/no-such-route", "/api/jobs/nope", "/api", "/nothing-here"])
async def test_an_unknown_route_is_a_json_404_with_a_code(api, path):
    response = await api.call("GET", path, token=await api.admin())

    assert response.status == 404
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"] == "Not found"
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["code"], str) and body["code"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/jobs/submit"),
    ("DELETE", "/api/jobs/list"),
    ("PUT", "/api/auth/login"),
    ("POST", "/api/files/download/file-" + "0" * 32),
])
async def test_a_wrong_method_is_a_json_405(api, method, path):
    response = await api.call(method, path, token=await api.admin())

    assert response.status == 405
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"] and body["message"] and body["code"]


async def test_a_405_names_the_allowed_methods(api):
    """RFC 9110 15.5.6: the server MUST send Allow with a 405."""
    response = await api.call("GET", "/api/jobs/submit", token=await api.admin())

    assert response.status == 405
    assert "POST" in response.headers.get("Allow", "")


# -- malformed bodies -----------------------------------------------------------


@pytest.mark.parametrize("path, who", [
    ("/api/auth/login", None), ("/api/users", "admin"), ("/api/workers/register", "registration"),
    ("/api/workers/heartbeat", "worker"), ("/api/jobs/submit", "admin"), ("/api/jobs/stream-output", "worker"),
    ("/api/jobs/submit-result", "worker"), ("/api/jobs/cancel", "admin"),
])
@pytest.mark.parametrize("raw", [b"{broken", b"[]", b"\xff", b""])
async def test_a_malformed_json_body_is_400_on_every_endpoint(api, path, who, raw):
    credentials = {"admin": {"token": await api.admin()}, "worker": {"worker": await api.register()},
                   "registration": {"token": REGISTRATION_TOKEN}, None: {}}[who]
    api.forget_cookies()

    response = await api.call("POST", path, data=raw, headers={"Content-Type": "application/json"}, **credentials)

    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["error"] == "Invalid request" and body["code"]
