"""Users and their tokens: login, logout, refresh, JWT verification, the auth cookie and its
same-origin rule, the persisted secret, the admin-only user API, and personal API tokens."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path

import jwt
import pytest

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Api, run_sql, secret_of, sqlite_only

INVALID_CREDENTIALS = {"error": "Invalid credentials", "message": "Email or password incorrect"}


def claims_for(user_id: str, *, expired_seconds_ago: float) -> dict:
    exp = int(time.time() - expired_seconds_ago)
    return {"sub": user_id, "role": "admin", "jti": uuid.uuid4().hex, "iat": exp - 24 * 3600, "exp": exp}


async def admin_id(api: Api) -> str:
    response = await api.call("POST", "/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    return (await response.json())["user"]["id"]


async def authorised(api: Api, token: str) -> int:
    """The status of an ordinary authenticated read with ``token`` (and no cookie)."""
    api.forget_cookies()
    return (await api.call("GET", "/api/jobs/list", token=token)).status


# -- login ----------------------------------------------------------------------


async def test_login_returns_token_user_and_lifetime(api):
    response = await api.call("POST", "/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})

    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    assert set(body["user"]) == {"id", "email", "role"}
    assert (body["user"]["email"], body["user"]["role"], body["expiresIn"]) == (ADMIN_EMAIL, "admin", "24h")
    assert isinstance(body["user"]["id"], str) and body["user"]["id"]
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["sub"] == body["user"]["id"]
    assert claims["exp"] - claims["iat"] == 24 * 3600
    assert await authorised(api, body["token"]) == 200


async def test_login_sets_an_httponly_samesite_strict_cookie_holding_the_token(api):
    response = await api.call("POST", "/api/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})

    token = (await response.json())["token"]
    cookies = [c for c in response.headers.getall("Set-Cookie") if c.startswith("auth_token=")]
    assert len(cookies) == 1
    attributes = [part.strip().lower() for part in cookies[0].split(";")]
    assert cookies[0].split(";")[0] == f"auth_token={token}"
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes


async def test_the_cookie_alone_authenticates(api):
    await api.admin()  # the login leaves the cookie in the client's jar

    response = await api.call("GET", "/api/jobs/list")

    assert response.status == 200


@pytest.mark.parametrize("email, password", [
    (ADMIN_EMAIL, "wrong-password"),
    ("nobody@example.com", ADMIN_PASSWORD),
    (ADMIN_EMAIL.upper(), "wrong-password"),
])
async def test_wrong_password_and_unknown_email_get_the_same_401(api, email, password):
    response = await api.call("POST", "/api/auth/login", json={"email": email, "password": password})

    body = await response.json()
    assert response.status == 401
    assert {k: body[k] for k in ("error", "message")} == INVALID_CREDENTIALS
    assert "token" not in body
    assert not [c for c in response.headers.getall("Set-Cookie", []) if c.startswith("auth_token=")]


@pytest.mark.parametrize("body, field", [
    ({}, "email"),
    ({"password": ADMIN_PASSWORD}, "email"),
    ({"email": ADMIN_EMAIL}, "password"),
    ({"email": ADMIN_EMAIL, "password": ""}, "password"),
    ({"email": ["a"], "password": ADMIN_PASSWORD}, "email"),
])
async def test_login_with_a_missing_field_is_400_naming_it(api, body, field):
    response = await api.call("POST", "/api/auth/login", json=body)

    error = await response.json()
    assert response.status == 400
    assert field in error["message"]
    assert error["code"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_login_with_a_malformed_body_is_400(api, raw):
    response = await api.call("POST", "/api/auth/login", data=raw, headers={"Content-Type": "application/json"})

    assert response.status == 400
    assert (await response.json())["error"] == "Invalid request"


# -- logout and refresh ---------------------------------------------------------


async def test_logout_revokes_the_token(api):
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    other = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()

    response = await api.call("POST", "/api/auth/logout", token=token)

    assert response.status == 200
    assert await response.json() == {"success": True, "message": "Logged out successfully"}
    assert await authorised(api, token) == 401
    assert (await api.call("POST", "/api/auth/logout", token=token)).status == 401
    assert await authorised(api, other) == 200  # only that token, not every session of the user


async def test_logout_without_a_token_is_401(api):
    response = await api.call("POST", "/api/auth/logout")

    assert response.status == 401
    assert (await response.json())["code"]


async def test_refresh_gives_a_new_working_token_and_revokes_the_old(api):
    old = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()

    response = await api.call("POST", "/api/auth/refresh", token=old)

    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    new = body["token"]
    assert new != old
    assert await authorised(api, new) == 200
    assert await authorised(api, old) == 401
    assert (await api.call("POST", "/api/auth/refresh", token=old)).status == 401  # refreshed once only


async def test_refresh_of_a_logged_out_token_is_401(api):
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    await api.call("POST", "/api/auth/logout", token=token)

    response = await api.call("POST", "/api/auth/refresh", token=token)

    assert response.status == 401


async def test_an_expired_token_is_refused_but_refreshed_within_the_grace_period(api, config):
    expired = jwt.encode(claims_for(await admin_id(api), expired_seconds_ago=3600), await secret_of(config),
                         algorithm="HS256")

    assert await authorised(api, expired) == 401
    response = await api.call("POST", "/api/auth/refresh", token=expired)

    assert response.status == 200, await response.text()
    new = (await response.json())["token"]
    assert await authorised(api, new) == 200
    assert (await api.call("POST", "/api/auth/refresh", token=expired)).status == 401  # now revoked


@pytest.mark.slow  # waits for a token to expire
async def test_a_token_that_worked_is_refused_once_it_expires(api, config):
    """The server remembers a token whose signature it checked; not past the token's expiry."""
    token = jwt.encode(claims_for(await admin_id(api), expired_seconds_ago=-2), await secret_of(config),
                       algorithm="HS256")
    api.forget_cookies()
    assert await authorised(api, token) == 200

    await asyncio.sleep(max(0.0, jwt.decode(token, options={"verify_signature": False})["exp"] - time.time()) + 0.1)

    assert await authorised(api, token) == 401


async def test_a_token_expired_beyond_the_grace_period_cannot_be_refreshed(api, config):
    expired = jwt.encode(claims_for(await admin_id(api), expired_seconds_ago=8 * 24 * 3600), await secret_of(config),
                         algorithm="HS256")
    api.forget_cookies()

    response = await api.call("POST", "/api/auth/refresh", token=expired)

    assert response.status == 401
    assert "token" not in await response.json()


def unsigned(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize("forge", ["alg-none", "wrong-key", "hs512-with-the-secret", "garbage"])
async def test_forged_tokens_are_refused(api, config, forge):
    claims = claims_for(await admin_id(api), expired_seconds_ago=-3600)  # valid for another hour
    secret = await secret_of(config)
    token = {
        "alg-none": lambda: unsigned(claims),
        "wrong-key": lambda: jwt.encode(claims, "not-the-secret-" * 4, algorithm="HS256"),
        "hs512-with-the-secret": lambda: jwt.encode(claims, secret, algorithm="HS512"),
        "garbage": lambda: "not.a.jwt",
    }[forge]()
    api.forget_cookies()

    assert await authorised(api, token) == 401
    assert (await api.call("POST", "/api/auth/refresh", token=token)).status == 401
    assert (await api.call("POST", "/api/jobs/submit", token=token, json={"command": "id"})).status == 401


async def test_a_genuine_token_signed_with_the_secret_is_accepted(api, config):
    """The forged-token test above would pass on a server that refused everything."""
    token = jwt.encode(claims_for(await admin_id(api), expired_seconds_ago=-3600), await secret_of(config),
                       algorithm="HS256")

    assert await authorised(api, token) == 200


# -- persistence ----------------------------------------------------------------


async def test_tokens_and_revocations_survive_a_restart(api, make_client):
    kept = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    revoked = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    assert (await api.call("POST", "/api/auth/logout", token=revoked)).status == 200
    await api.client.close()

    restarted = Api(await make_client())  # a new app on the same data dir

    assert (await restarted.call("GET", "/api/jobs/list", token=kept)).status == 200
    assert (await restarted.call("GET", "/api/jobs/list", token=revoked)).status == 401


@sqlite_only
async def test_jwt_secret_is_kept_with_mode_0600(api, config):
    await api.admin()
    path = Path(config.data_dir) / "jwt_secret"

    mode = stat.S_IMODE(os.stat(path).st_mode)

    assert mode == 0o600
    assert len(await secret_of(config)) >= 32


# -- cookie and origin ----------------------------------------------------------


def own_origin(api: Api) -> str:
    return f"http://{api.client.host}:{api.client.port}"


@pytest.mark.parametrize("origin_headers, expected", [
    ({"Origin": "http://evil.example"}, 403),
    ({"Referer": "http://evil.example/page.html"}, 403),
    ({"Origin": "null"}, 403),
    ({}, 201),
    ({"Origin": "SAME"}, 201),
])
async def test_cookie_authenticated_post_must_come_from_the_same_origin(api, origin_headers, expected):
    await api.admin()  # sets the cookie; no bearer header below
    headers = {k: own_origin(api) if v == "SAME" else v for k, v in origin_headers.items()}

    response = await api.call("POST", "/api/jobs/submit", json={"command": "echo hi"}, headers=headers)

    assert response.status == expected, await response.text()
    total = (await (await api.call("GET", "/api/jobs/list")).json())["total"]
    assert total == (1 if expected == 201 else 0)


@pytest.mark.parametrize("origin, expected", [("http://evil.example", 403), ("SAME", 200), (None, 200)])
async def test_cookie_authenticated_refresh_must_come_from_the_same_origin(api, origin, expected):
    """Refresh revokes the old token and sets a new cookie: a state change like any other."""
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)  # also the cookie
    headers = {} if origin is None else {"Origin": own_origin(api) if origin == "SAME" else origin}

    response = await api.call("POST", "/api/auth/refresh", headers=headers)

    assert response.status == expected, await response.text()
    assert await authorised(api, token) == (200 if expected == 403 else 401)


async def test_a_bearer_token_is_not_subject_to_the_origin_check(api):
    token = await api.admin()
    api.forget_cookies()

    response = await api.call("POST", "/api/jobs/submit", token=token, json={"command": "echo hi"},
                              headers={"Origin": "http://evil.example"})

    assert response.status == 201


async def test_cookie_authenticated_read_from_a_foreign_origin_is_not_refused(api):
    """Only state changes are checked; a GET changes nothing (and CORS keeps its answer from the page)."""
    await api.admin()

    response = await api.call("GET", "/api/jobs/list", headers={"Origin": "http://evil.example"})

    assert response.status == 200


# -- the user API ---------------------------------------------------------------


async def test_admin_lists_creates_and_deletes_users(api):
    admin = await api.admin()

    created = await api.call("POST", "/api/users", token=admin,
                             json={"email": "dev@example.com", "password": "dev-password", "role": "user"})
    body = await created.json()
    assert created.status == 201
    assert (body["success"], body["user"]["email"], body["user"]["role"]) == (True, "dev@example.com", "user")
    user_id = body["user"]["id"]
    assert await api.login("dev@example.com", "dev-password")

    listing = await (await api.call("GET", "/api/users", token=admin)).json()
    assert sorted(u["email"] for u in listing["users"]) == [ADMIN_EMAIL, "dev@example.com"]

    deleted = await api.call("DELETE", f"/api/users/{user_id}", token=admin)
    assert deleted.status == 200
    gone = await api.call("POST", "/api/auth/login", json={"email": "dev@example.com", "password": "dev-password"})
    assert gone.status == 401
    assert (await api.call("DELETE", f"/api/users/{user_id}", token=admin)).status == 404


async def test_a_deleted_users_token_stops_working(api):
    token, user_id = await api.new_user()

    await api.call("DELETE", f"/api/users/{user_id}", token=await api.admin())

    assert await authorised(api, token) == 401


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/users", None),
    ("POST", "/api/users", {"email": "x@example.com", "password": "long-enough", "role": "admin"}),
    ("DELETE", "/api/users/ADMIN", None),
])
async def test_user_api_is_admin_only(api, method, path, body):
    token, _ = await api.new_user()
    path = path.replace("ADMIN", await admin_id(api))
    api.forget_cookies()

    as_user = await api.call(method, path, token=token, json=body)
    anonymous = await api.call(method, path, json=body)

    assert as_user.status == 403
    assert (await as_user.json())["error"] == "Forbidden"
    assert anonymous.status == 401
    users = await (await api.call("GET", "/api/users", token=await api.admin())).json()
    assert sorted(u["email"] for u in users["users"]) == [ADMIN_EMAIL, "user@example.com"]


async def test_worker_token_cannot_use_the_user_api(api):
    worker = await api.register()
    api.forget_cookies()

    response = await api.call("GET", "/api/users", worker=worker)

    assert response.status == 403


async def test_duplicate_email_is_409(api):
    admin = await api.admin()
    await api.new_user("dev@example.com")

    response = await api.call("POST", "/api/users", token=admin,
                              json={"email": "dev@example.com", "password": "another-password", "role": "user"})
    same_admin = await api.call("POST", "/api/users", token=admin,
                                json={"email": ADMIN_EMAIL, "password": "another-password", "role": "admin"})

    assert response.status == 409
    assert (await response.json())["error"] == "Conflict"
    assert same_admin.status == 409
    assert await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)  # the first account is untouched


@pytest.mark.parametrize("body, field", [
    ({"email": "x@example.com", "password": "long-enough", "role": "root"}, "role"),
    ({"email": "x@example.com", "password": "long-enough", "role": 1}, "role"),
    ({"email": "not-an-email", "password": "long-enough", "role": "user"}, "email"),
    ({"password": "long-enough", "role": "user"}, "email"),
    ({"email": "x@example.com", "role": "user"}, "password"),
])
async def test_bad_new_user_is_400_naming_the_field_and_creates_nothing(api, body, field):
    admin = await api.admin()

    response = await api.call("POST", "/api/users", token=admin, json=body)

    assert response.status == 400
    assert field in (await response.json())["message"]
    users = await (await api.call("GET", "/api/users", token=admin)).json()
    assert [u["email"] for u in users["users"]] == [ADMIN_EMAIL]


async def test_no_response_carries_a_password_hash(api):
    admin = await api.admin()
    texts = []
    for method, path, body in [
        ("POST", "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
        ("POST", "/api/users", {"email": "dev@example.com", "password": "dev-password", "role": "user"}),
        ("GET", "/api/users", None),
        ("GET", "/api/auth/me", None),
        ("POST", "/api/auth/refresh", None),
    ]:
        response = await api.call(method, path, token=admin if path != "/api/auth/login" else None, json=body)
        assert response.status in (200, 201), (path, await response.text())
        texts.append(await response.text())
    for text in texts:
        assert "$2b$" not in text and "$2a$" not in text
        assert "password" not in text.lower()


# -- personal API tokens ----------------------------------------------------------


async def create_api_token(api: Api, token: str, **body) -> dict:
    response = await api.call("POST", "/api/auth/tokens", token=token, json={"name": "ci script", **body})
    assert response.status == 201, await response.text()
    return await response.json()


async def test_an_api_token_is_shown_once_kept_as_a_hash_and_acts_as_its_user(api, config):
    user, user_id = await api.new_user()
    api.forget_cookies()

    created = await create_api_token(api, user, expiresInDays=30)

    token = created["token"]
    assert token.startswith("dsp_") and len(token) > 40
    assert set(created) == {"success", "token", "id", "name", "createdAt", "expiresAt"}
    assert created["name"] == "ci script"
    lifetime = dt.datetime.fromisoformat(created["expiresAt"][:-1]) - dt.datetime.fromisoformat(created["createdAt"][:-1])
    assert lifetime == dt.timedelta(days=30)
    me = await (await api.call("GET", "/api/auth/me", token=token)).json()
    assert (me["user"]["id"], me["user"]["role"]) == (user_id, "user")
    assert me["expiresAt"][:19] == created["expiresAt"][:19]  # to the second
    assert (await api.call("POST", "/api/jobs/submit", token=token, json={"command": "make"})).status == 201
    listed = await (await api.call("GET", "/api/auth/tokens", token=token)).json()
    assert listed == {"success": True, "total": 1, "tokens": [{k: created[k] for k in
                                                               ("id", "name", "createdAt", "expiresAt")}]}
    assert await run_sql(config, "SELECT token_hash FROM api_tokens") == [
        (hashlib.sha256(token.encode()).hexdigest(),)]
    assert token not in repr(await run_sql(config, "SELECT * FROM api_tokens"))
    if not config.database_url:
        assert token.encode() not in (Path(config.data_dir) / "dispatch.db").read_bytes()


async def test_an_api_token_expires_in_90_days_unless_told(api):
    created = await create_api_token(api, await api.admin())

    lifetime = dt.datetime.fromisoformat(created["expiresAt"][:-1]) - dt.datetime.fromisoformat(created["createdAt"][:-1])
    assert lifetime == dt.timedelta(days=90)


async def test_an_api_token_is_refused_on_worker_endpoints_on_refresh_and_as_a_cookie(api):
    token = (await create_api_token(api, await api.admin()))["token"]
    api.forget_cookies()

    get_job = await api.call("GET", "/api/jobs/get-job", token=token)
    heartbeat = await api.call("POST", "/api/workers/heartbeat", token=token, json={})
    refresh = await api.call("POST", "/api/auth/refresh", token=token)
    cookie = await api.call("GET", "/api/jobs/list", headers={"Cookie": f"auth_token={token}"})

    assert (get_job.status, heartbeat.status) == (403, 403)
    assert "Only workers" in (await get_job.json())["message"]
    assert (refresh.status, (await refresh.json())["code"]) == (401, "API_TOKEN_NOT_REFRESHABLE")
    assert "token" not in await refresh.json()
    assert cookie.status == 401


async def test_deleting_an_api_token_ends_it_at_once_and_only_its_owner_may(api):
    owner, _ = await api.new_user("owner@example.com")
    other, _ = await api.new_user("other@example.com")
    admin = await api.admin()
    api.forget_cookies()
    created = await create_api_token(api, owner)
    path = f"/api/auth/tokens/{created['id']}"

    assert (await api.call("DELETE", path, token=other)).status == 404
    assert (await api.call("DELETE", path, token=admin)).status == 404
    assert await authorised(api, created["token"]) == 200
    assert (await api.call("DELETE", path, token=owner)).status == 200

    assert await authorised(api, created["token"]) == 401
    assert (await api.call("DELETE", path, token=owner)).status == 404
    assert (await (await api.call("GET", "/api/auth/tokens", token=owner)).json())["total"] == 0


async def test_logging_out_with_an_api_token_ends_it(api):
    token = (await create_api_token(api, await api.admin()))["token"]
    api.forget_cookies()

    assert (await api.call("POST", "/api/auth/logout", token=token)).status == 200

    assert await authorised(api, token) == 401


async def test_an_expired_api_token_is_refused(api, clock):
    token = (await create_api_token(api, await api.admin(), expiresInDays=1))["token"]
    api.forget_cookies()
    clock.advance(24 * 3600 + 1)

    response = await api.call("GET", "/api/jobs/list", token=token)

    assert (response.status, (await response.json())["code"]) == (401, "TOKEN_EXPIRED")


async def test_a_deleted_users_api_tokens_go_with_them(api, config):
    user, user_id = await api.new_user()
    token = (await create_api_token(api, user))["token"]

    await api.call("DELETE", f"/api/users/{user_id}", token=await api.admin())

    assert await authorised(api, token) == 401
    assert await run_sql(config, "SELECT COUNT(*) FROM api_tokens") == [(0,)]


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": 7}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"name": "two\nlines"}, "name"),
    ({"name": "ci", "expiresInDays": 0}, "expiresInDays"),
    ({"name": "ci", "expiresInDays": 3651}, "expiresInDays"),
    ({"name": "ci", "expiresInDays": "30"}, "expiresInDays"),
    ({"name": "ci", "expiresInDays": True}, "expiresInDays"),
    ({"name": "ci", "expiresInDays": 1.5}, "expiresInDays"),
])
async def test_a_bad_api_token_request_is_400_naming_the_field_and_creates_nothing(api, body, field):
    admin = await api.admin()

    response = await api.call("POST", "/api/auth/tokens", token=admin, json=body)

    error = await response.json()
    assert (response.status, error["code"], error["details"]["field"]) == (400, "VALIDATION_ERROR", field)
    assert (await (await api.call("GET", "/api/auth/tokens", token=admin)).json())["total"] == 0


async def test_the_longest_api_token_name_and_lifetime_are_allowed(api):
    created = await create_api_token(api, await api.admin(), name="é" * 100, expiresInDays=3650)

    assert created["name"] == "é" * 100
