"""The web page in a real headless Chromium, against a real ``dispatch.py`` and a real ``agent.py``.

One server and one agent serve the whole module (starting them is most of the cost); each test has
its own browser context, so its own cookies. Every wait is bounded (Playwright's timeouts below).
A screenshot of a finished job's page is kept in tests/artifacts/job-page.png (not committed).
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import jwt
import pytest

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ServerProcess, make_zip, server_environment

sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need Playwright (pip install playwright)")

from page_support import CHROMIUM, Agent, Api, launch_chromium, start_server  # noqa: E402

expect = sync_api.expect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"the page tests need Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the jobs here are /bin/sh commands"),
]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WORKER_ID = "page-desktop"
TIMEOUT_MS = 10_000
expect.set_options(timeout=TIMEOUT_MS)


# --- the farm: one server, one agent, one browser for the module ---------------------------------


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    server = start_server(folder)
    agent = Agent(folder / "desktop", server.url, WORKER_ID, "--concurrency", "2", "--cpus", "2", "--tags", "linux")
    try:
        api = Api(server.url).login()
        api.wait_for_worker(WORKER_ID, agent)
        yield server, agent, api
    finally:
        agent.stop()
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, farm):
    """A fresh browser context (no cookies) on the farm's page. Uncaught script errors and CSP
    violations fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=farm[0].url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}")
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def api(farm) -> Api:
    return farm[2]


def log_in(page, password: str = ADMIN_PASSWORD) -> None:
    page.fill("#login-form [name=email]", ADMIN_EMAIL)
    page.fill("#login-form [name=password]", password)
    page.click("#login-form button[type=submit]")


def last_tick(log) -> int:
    return max(map(int, re.findall(r"tick (\d+)", log.inner_text())))


def open_logged_in(page, path: str = "/") -> None:
    page.goto(path)
    log_in(page)
    expect(page.locator("#who")).to_have_text(ADMIN_EMAIL)


def shown_output(page, expected: str, within: float = 5) -> str:
    """The log's text once it equals `expected`, or as it stands after `within` seconds."""
    log = page.locator("#log")
    deadline = time.monotonic() + within
    while (text := log.evaluate("el => el.textContent")) != expected and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    return text


def late_status_answers(api, job_id: str, held: list):
    """A route handler for the page's status requests that answers late, as a slow server or a long log
    would: it has the server answer at once, then holds the answer until the job has printed more, so
    the page gets output over its socket that the answer does not hold, before the answer."""
    def handle(route):
        response = route.fetch()
        job = response.json()["job"]
        if job["status"] == "running":
            deadline = time.monotonic() + 5
            while len(api.status(job_id)["stdout"]) <= len(job["stdout"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # the socket's copy of the new output reaches the page meanwhile
            held.append(job)
        route.fulfill(response=response)
    return handle


# --- tests -----------------------------------------------------------------------------------------


def test_login_wrong_password_then_right_then_logout(page):
    response = page.goto("/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers.get("content-security-policy", "")
    assert "no-cache" in response.headers.get("cache-control", "")
    expect(page.locator("#view-login")).to_be_visible()
    expect(page.locator("#login-message")).to_be_hidden()  # a first visit is no error

    log_in(page, "not-the-password")
    expect(page.locator("#login-message")).to_have_text("Wrong email or password. Try again.")
    expect(page.locator("#view-farm")).to_be_hidden()

    log_in(page)
    expect(page.locator("#view-farm")).to_be_visible()
    expect(page.locator("#who")).to_have_text(ADMIN_EMAIL)
    # The page never holds the token itself: the HttpOnly cookie does.
    assert page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == "{}{}"
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["auth_token"]["httpOnly"] and cookies["auth_token"]["sameSite"] == "Strict"
    assert "auth_token" not in page.evaluate("document.cookie")

    page.reload()  # the cookie keeps the session
    expect(page.locator("#who")).to_have_text(ADMIN_EMAIL)

    page.click("#logout")
    expect(page.locator("#login-message")).to_have_text("You are logged out.")
    expect(page.locator("#workers tbody tr")).to_have_count(0)  # nothing of the farm is left in the page
    page.reload()
    expect(page.locator("#view-login")).to_be_visible()


def test_expired_session_says_so_and_logging_in_again_works(page, farm, api):
    server = farm[0]
    secret = (server.data_dir / "jwt_secret").read_text().strip()
    past = int(time.time()) - 3600
    expired = jwt.encode({"sub": api.user["id"], "role": "admin", "jti": "expired-for-page-test",
                          "iat": past - 86400, "exp": past}, secret, algorithm="HS256")
    page.context.add_cookies([{"name": "auth_token", "value": expired, "url": server.url,
                               "httpOnly": True, "sameSite": "Strict"}])
    page.goto("/")
    expect(page.locator("#login-message")).to_contain_text("session expired")
    log_in(page)  # the stale cookie must not stand in the way
    expect(page.locator("#who")).to_have_text(ADMIN_EMAIL)


def test_submit_with_zip_follows_output_live_and_shows_exit_code(page, api):
    open_logged_in(page, "/#/submit")
    form = page.locator("#submit-form")
    form.locator("[name=command]").fill(
        'cat greeting.txt; for i in 1 2 3 4; do echo "line $i"; sleep 1; done; echo "to stderr" >&2')
    form.locator("[name=workingDirectory]").fill("project")
    form.locator("[name=timeout]").fill("60")
    form.locator("label", has_text="high").click()
    form.locator("[name=tags]").fill("linux")
    form.locator("[name=file]").set_input_files({
        "name": "project.zip", "mimeType": "application/zip",
        "buffer": make_zip({"project/greeting.txt": "hello from the zip\n"})})
    page.click("#submit-button")

    expect(page).to_have_url(re.compile(r"#/jobs/job-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    assert page.locator("#upload-bar").evaluate("bar => bar.value") == 100
    expect(page.locator("#upload-text")).to_have_text(re.compile(r"^Uploaded project\.zip"))

    log = page.locator("#log")
    expect(log).to_contain_text("line 1")
    # The first line is on screen while the job still runs and before its last line exists.
    expect(page.locator("#job-status")).to_have_text("running")
    assert "line 4" not in log.inner_text()
    assert api.status(job_id)["status"] == "running"
    expect(log).to_contain_text("hello from the zip")

    expect(page.locator("#job-status")).to_have_text("completed", timeout=15_000)
    expect(page.locator("#job-exit")).to_have_text("exit 0")
    text = log.inner_text()
    assert text.count("line 1") == 1 and text.index("line 1") < text.index("line 4")  # once each, in order
    expect(log.locator(".e")).to_have_text("to stderr\n")  # stderr is marked as such
    expect(page.locator("#job-meta")).to_contain_text(WORKER_ID)
    expect(page.locator("#job-meta")).to_contain_text("high")
    download = page.locator("#job-file")
    expect(download).to_have_text("⤓ project.zip")
    assert re.fullmatch(r"/uploads/file-[0-9a-f]+/project\.zip", download.get_attribute("href"))
    expect(page.locator("#job-cancel")).to_be_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)

    # The stream filter shows one stream at a time.
    page.click("#log-streams button[data-stream=stdout]")
    expect(log.locator(".e")).to_be_hidden()
    expect(log.locator(".o").first).to_be_visible()


def test_cancel_a_long_job_from_the_page_and_autoscroll(page, api):
    open_logged_in(page, "/")
    job_id = api.submit('seq -f "row %g" 1 80; i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.3; done',
                        timeout=120)

    # The farm updates by itself: the worker turns busy with the job, and the job's row appears.
    worker_row = page.locator("#workers tbody tr", has_text=WORKER_ID)
    expect(worker_row.locator(".badge")).to_have_text("busy")
    expect(worker_row).to_contain_text("seq -f")
    job_row = page.locator(f"#jobs tbody tr[data-href='#/jobs/{job_id}']")
    expect(job_row.locator(".badge")).to_have_text("running")

    job_row.locator("td").last.click()  # anywhere on the row opens the job
    expect(page).to_have_url(re.compile(f"#/jobs/{job_id}$"))
    log = page.locator("#log")
    expect(log).to_contain_text("tick 2")

    # Following: the newest line is in view. Scrolling up stops that; new lines do not pull the view
    # back down until the reader returns to the bottom (here with the button).
    distance_from_bottom = "el => el.scrollHeight - el.scrollTop - el.clientHeight"
    assert log.evaluate("el => el.scrollHeight > el.clientHeight + 100")
    expect(log).to_contain_text(f"tick {last_tick(log) + 1}")
    assert log.evaluate(distance_from_bottom) < 30
    log.hover()
    page.mouse.wheel(0, -400)
    expect(page.locator("#log-follow")).to_be_visible()
    top = log.evaluate("el => el.scrollTop")
    expect(log).to_contain_text(f"tick {last_tick(log) + 3}")
    assert log.evaluate("el => el.scrollTop") == top
    page.click("#log-follow")
    expect(page.locator("#log-follow")).to_be_hidden()
    expect(log).to_contain_text(f"tick {last_tick(log) + 2}")
    assert log.evaluate(distance_from_bottom) < 30

    cancel = page.locator("#job-cancel")
    cancel.click()
    expect(cancel).to_have_text("Click again to cancel")
    assert api.status(job_id)["status"] == "running"  # one click only arms it
    cancel.click()

    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(cancel).to_be_hidden()
    expect(page.locator("#job-error")).to_contain_text("cancelled by")
    assert api.status(job_id)["status"] == "cancelled"


def test_run_again_reuses_the_input_and_shows_field_errors(page, api):
    file_url = api.upload(make_zip({"greeting.txt": "hello again\n"}), "again.zip")
    first = api.submit("cat greeting.txt", fileUrl=file_url, priority="low", tags=["linux"])
    api.wait(first)

    open_logged_in(page, f"/#/jobs/{first}")
    expect(page.locator("#job-status")).to_have_text("completed")
    page.click("#job-rerun")
    expect(page).to_have_url(re.compile(r"#/submit\?from="))
    form = page.locator("#submit-form")
    expect(form.locator("[name=command]")).to_have_value("cat greeting.txt")
    expect(form.locator("[name=tags]")).to_have_value("linux")
    expect(form.locator("[name=priority][value=low]")).to_be_checked()
    expect(page.locator("#reuse")).to_contain_text("again.zip")

    # The server's 400 names the field; the page puts the message under that field.
    directory = form.locator("[name=workingDirectory]")
    directory.fill("../outside")
    page.click("#submit-button")
    expect(form.locator(".field-error")).to_contain_text("workingDirectory must be a relative path")
    expect(directory).to_have_attribute("aria-invalid", "true")
    assert "/submit" in page.url

    directory.fill("")
    page.click("#submit-button")
    expect(page).to_have_url(re.compile(r"#/jobs/job-[0-9a-f]+$"))
    second = page.url.rsplit("/", 1)[1]
    assert second != first
    expect(page.locator("#job-status")).to_have_text("completed")
    expect(page.locator("#log")).to_have_text("hello again\n")
    assert api.status(second)["fileUrl"] == file_url


def test_output_with_html_and_ansi_stays_text(page, api):
    payload = "<script>window.pwned=1</script><img src=x onerror=window.pwned=1>"
    job_id = api.submit(f"echo '{payload}'; printf '\\033[1;31mred\\033[0m plain\\n'; exit 5")
    api.wait(job_id)

    open_logged_in(page, "/")
    row = page.locator(f"#jobs tbody tr[data-href='#/jobs/{job_id}']")
    expect(row.locator(".cmd")).to_contain_text(payload)  # the command, too, is text

    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("failed")
    expect(page.locator("#job-exit")).to_have_text("exit 5")
    log = page.locator("#log")
    expect(log).to_contain_text(payload)
    expect(page.locator("#job-command")).to_contain_text(payload)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#log img, #log script, #job-command img, #jobs img").count() == 0
    assert page.evaluate("document.scripts.length") == 1  # only the page's own

    # ANSI colour codes are rendered (bold red), not shown as escape junk.
    text = log.inner_text()
    assert "red plain" in text and "\x1b" not in text and "[1;31m" not in text
    red = log.locator("span", has_text=re.compile(r"^red$"))
    assert red.evaluate("el => getComputedStyle(el).color") == "rgb(255, 107, 107)"
    assert red.evaluate("el => getComputedStyle(el).fontWeight") == "700"


def test_a_job_page_links_its_artifacts_with_their_file_count(page, api, tmp_path):
    job_id = api.submit("mkdir -p dist/sub; echo a > dist/a.txt; echo b > dist/sub/b.txt", artifacts=["dist/**"])
    api.wait(job_id)

    open_logged_in(page, f"/#/jobs/{job_id}")
    link = page.locator("#job-artifacts")
    expect(link).to_have_text(re.compile(r"^⤓ 2 files, \d+ B$"))
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "artifacts.zip"
    download.value.save_as(saved)
    import zipfile

    with zipfile.ZipFile(saved) as archive:
        assert sorted(archive.namelist()) == ["dist/a.txt", "dist/sub/b.txt"]


def test_a_queued_job_says_what_it_waits_for_and_links_its_parents_and_children(page, api):
    parent = api.submit("true", tags=["windows"], memoryMb=1)  # no desktop here has the tag
    child = api.submit("true", after=[parent], cpus=2)

    open_logged_in(page, f"/#/jobs/{child}")
    expect(page.locator("#job-waiting")).to_have_text(f"waiting for {parent} (queued)")
    expect(page.locator("#job-meta")).to_contain_text("2 cpus")
    page.locator("#job-parents a").click()

    expect(page).to_have_url(re.compile(f"#/jobs/{parent}$"))
    expect(page.locator("#job-waiting")).to_have_text("no online worker has tags windows")
    expect(page.locator("#job-meta")).to_contain_text("1 cpu · 1 MB memory")
    expect(page.locator("#job-children a")).to_have_attribute("href", f"#/jobs/{child}")
    api.call("POST", "/api/jobs/cancel", {"jobId": parent})
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#job-waiting")).to_have_count(0)
    assert api.status(child)["error"] == f"parent {parent} cancelled"


def test_jobs_table_filters_sort_and_pages(page, api):
    # Jobs tagged for no worker stay queued: a stable set to page through.
    parked = [api.submit(f"echo parked {n}", tags=["parked"]) for n in range(27)]
    open_logged_in(page, "/")

    page.select_option("#job-filters [name=status]", "queued")
    expect(page).to_have_url(re.compile(r"#/\?status=queued$"))
    expect(page.locator("#jobs-range")).to_have_text("1–25 of 27")
    expect(page.locator("#jobs tbody tr")).to_have_count(25)
    expect(page.locator("#jobs tbody tr").first).to_have_attribute("data-href", f"#/jobs/{parked[-1]}")  # newest first
    page.click("#jobs-next")
    expect(page.locator("#jobs-range")).to_have_text("26–27 of 27")
    expect(page.locator("#jobs-next")).to_be_disabled()
    page.click("#jobs-prev")
    expect(page.locator("#jobs-range")).to_have_text("1–25 of 27")

    page.select_option("#job-filters [name=sort]", "createdAt")
    expect(page.locator("#jobs tbody tr").first).to_have_attribute("data-href", f"#/jobs/{parked[0]}")

    page.select_option("#job-filters [name=status]", "")
    page.select_option("#job-filters [name=worker]", WORKER_ID)
    expect(page).to_have_url(re.compile(rf"#/\?sort=createdAt&worker={WORKER_ID}$"))
    ran_here = api.call("GET", f"/api/jobs/list?workerId={WORKER_ID}&limit=1")[1]["total"]
    expect(page.locator("#jobs-range")).to_have_text(f"1–{min(ran_here, 25)} of {ran_here}")
    workers = page.locator("#jobs tbody tr td:nth-child(4)").all_inner_texts()
    assert workers and set(workers) == {WORKER_ID}

    # Workers: one row, with what the agent reported, and a heartbeat counted in seconds.
    row = page.locator("#workers tbody tr", has_text=WORKER_ID)
    expect(row.locator(".badge")).to_have_text(re.compile("^(online|busy)$"))
    expect(row).to_contain_text(re.compile(r"\d+ s ago"))
    expect(row.locator(".tag")).to_have_text("linux")

    for job_id in parked:  # leave the queue as it was
        api.call("POST", "/api/jobs/cancel", {"jobId": job_id})


def test_phone_width_and_dark_scheme(browser, farm):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", base_url=farm[0].url,
                                  is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        open_logged_in(page, "/")
        expect(page.locator("#workers tbody tr").first).to_be_visible()
        # Nothing pushes the page sideways; wide tables scroll inside their panel.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert sum(map(int, re.findall(r"\d+", background)[:3])) < 100, background  # dark
    finally:
        context.close()


# --- output: what came before and what comes live, joined by offset -------------------------------


@pytest.mark.parametrize("line", ["line-$i", "same", "\U0001F600 line-$i"], ids=["numbered", "repeated", "emoji"])
def test_history_and_live_output_join_without_overlap_or_gap(page, api, line):
    # Opened while the job runs, the page shows the output so far from the status answer, then the
    # output that comes over the socket. The answer is held back (late_status_answers) so that chunks
    # printed after it was read reach the page first. Identical lines are where guessing the overlap
    # from the text fails: the answer ends with "same" lines whether or not it holds those chunks.
    # An emoji is one character to the server's offsets and two UTF-16 units to JavaScript.
    job_id = api.submit(f"for i in $(seq 1 200); do echo {line}; sleep 0.02; done")
    api.wait(job_id, until=lambda job: job["stdout"].count("\n") >= 20)
    open_logged_in(page, "/")
    held: list[dict] = []
    page.route(lambda url: "/api/jobs/status?" in url, late_status_answers(api, job_id, held))
    page.goto(f"/#/jobs/{job_id}")

    expect(page.locator("#job-status")).to_have_text("completed", timeout=20_000)
    assert held, "the job had finished before the page asked for it"
    assert 20 <= held[-1]["stdout"].count("\n") < 200
    final = api.status(job_id)["stdout"]
    assert final == "".join(f"{line.replace('$i', str(i))}\n" for i in range(1, 201))
    shown = shown_output(page, final)
    assert shown == final, f"{shown.count(chr(10))} lines shown of {final.count(chr(10))}"


def test_a_lost_output_event_is_loaded_again_not_left_out(page, api):
    # An output event that never reaches the page (here dropped on its way) leaves a gap that the
    # next chunk's offset shows; the page loads the status again rather than show a log with a hole.
    job_id = api.submit("for i in $(seq 1 200); do echo line-$i; sleep 0.02; done")
    dropped: list[dict] = []

    def route_socket(ws):
        server = ws.connect_to_server()

        def to_page(message):
            event = json.loads(message)
            first = re.search(r"line-(\d+)", event.get("data") or "")
            if not dropped and event["type"] == "job.output" and first and int(first[1]) >= 100:
                dropped.append(event)
            else:
                ws.send(message)
        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/api/jobs/stream\?jobId="), route_socket)
    open_logged_in(page, f"/#/jobs/{job_id}")
    expect(page.locator("#log")).to_contain_text("line-50\n")  # the page is in step before the loss
    expect(page.locator("#job-status")).to_have_text("completed", timeout=20_000)
    assert dropped, "no output event was dropped"
    final = api.status(job_id)["stdout"]
    assert final == "".join(f"line-{i}\n" for i in range(1, 201))
    shown = shown_output(page, final)
    assert shown == final, f"{shown.count(chr(10))} lines shown of {final.count(chr(10))}"


def test_a_retried_job_shows_the_output_of_its_new_attempt_alone(page, api, tmp_path):
    # The second attempt's offsets start again at 0: the page starts its log again, too.
    marker = tmp_path / "first-attempt"
    job_id = api.submit(f"if [ -e '{marker}' ]; then a=second; else a=first; touch '{marker}'; fi; "
                        "for i in $(seq 1 100); do echo $a-$i; sleep 0.02; done; [ $a = second ]", retries=1)
    api.wait(job_id, until=lambda job: "first-10\n" in job["stdout"])
    open_logged_in(page, f"/#/jobs/{job_id}")
    log = page.locator("#log")
    expect(log).to_contain_text("first-20\n")
    expect(log).to_contain_text("second-1\n", timeout=20_000)
    expect(page.locator("#job-status")).to_have_text("completed", timeout=20_000)
    job = api.status(job_id)
    assert job["attempts"] == 2
    assert job["stdout"] == "".join(f"second-{i}\n" for i in range(1, 101))
    shown = shown_output(page, job["stdout"])
    assert shown == job["stdout"], f"{shown.count(chr(10))} lines shown of {job['stdout'].count(chr(10))}"


def test_an_admin_approves_a_pending_desktop_on_the_page_and_its_agent_runs_the_queued_job(browser, tmp_path):
    """With DISPATCH_APPROVE_WORKERS=1 a real agent registers as pending and keeps polling, running
    nothing; a user sees it waiting, an admin approves it on the page, and the job runs."""
    server = ServerProcess(tmp_path / "data", server_environment(DISPATCH_HEARTBEAT_INTERVAL="2",
                                                                 DISPATCH_APPROVE_WORKERS="1")).start()
    agent = Agent(tmp_path / "desktop", server.url, "new-desktop")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    problems: list[str] = []
    try:
        api = Api(server.url).login()
        api.wait_for_worker("new-desktop", agent)
        job_id = api.submit("echo approved")
        assert api.call("POST", "/api/users", {"email": "dev@example.com", "password": "dev-password"})[0] == 201
        as_user = browser.new_page(base_url=server.url)
        as_user.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        as_user.goto("/")
        as_user.fill("#login-form [name=email]", "dev@example.com")
        as_user.fill("#login-form [name=password]", "dev-password")
        as_user.click("#login-form button[type=submit]")
        user_row = as_user.locator("#workers tbody tr[data-worker=new-desktop]")
        expect(user_row.locator(".s-pending")).to_have_text("pending")
        expect(user_row.get_by_role("button", name="Approve")).to_have_count(0)  # only an admin approves
        expect(user_row.get_by_role("button", name="Delete")).to_have_count(0)  # ... or deletes
        expect(as_user.locator("#rotate-token")).to_be_hidden()
        as_user.context.close()

        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        open_logged_in(page)
        row = page.locator("#workers tbody tr[data-worker=new-desktop]")
        expect(row.locator(".s-pending")).to_have_text("pending")
        expect(page.locator("#workers-summary")).to_contain_text("1 waiting for approval")
        assert api.status(job_id)["status"] == "queued"  # the agent has polled for seconds by now

        row.get_by_role("button", name="Approve").click()

        expect(row.locator(".s-pending")).to_have_count(0)
        expect(row.get_by_role("button", name="Approve")).to_have_count(0)
        job = api.wait(job_id)
        assert (job["status"], job["stdout"], job["workerId"]) == ("completed", "approved\n", "new-desktop")
        assert agent.process.poll() is None, agent.log()
    finally:
        context.close()
        agent.stop()
        server.stop()
    assert not problems, problems


# --- the page lives on the WebSocket ---------------------------------------------------------------


def requests_of(page) -> list[str]:
    """The HTTP requests the page makes from now on (its WebSocket is not one), as "METHOD path"."""
    asked: list[str] = []
    page.on("request", lambda request: asked.append(f"{request.method} {request.url.split('/', 3)[3]}"))
    return asked


def worker_heartbeat(server_url: str, worker_token: str, **body) -> int:
    request = urllib.request.Request(server_url + "/api/workers/heartbeat", method="POST",
                                     data=json.dumps({"status": "idle", **body}).encode(),
                                     headers={"x-worker-token": worker_token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_the_farm_follows_jobs_and_workers_from_the_socket_without_asking(page, farm, api):
    open_logged_in(page, "/")
    desktop = page.locator(f"#workers tbody tr[data-worker={WORKER_ID}]")
    expect(desktop).to_be_visible()
    expect(page.locator("#conn")).to_have_text("live")
    page.wait_for_timeout(500)  # the first loads have answered
    done, running = int(desktop.locator("td").nth(7).inner_text()), int(page.locator("#stat-running").inner_text())
    asked = requests_of(page)

    job_id = api.submit("sleep 1.5; echo done", tags=["linux"])
    row = page.locator(f"#jobs tbody tr[data-href='#/jobs/{job_id}']")
    expect(row.locator(".badge")).to_have_text("running")
    expect(page.locator("#stat-running")).to_have_text(str(running + 1))
    expect(desktop.locator(".badge").first).to_have_text("busy")
    expect(desktop).to_contain_text("sleep 1.5")  # its current job's command
    expect(row.locator(".badge")).to_have_text("completed", timeout=15_000)
    expect(page.locator("#stat-running")).to_have_text(str(running))
    expect(desktop.locator("td").nth(7)).to_have_text(str(done + 1))  # jobs done, as the server counts them

    # A desktop registers, its agent stops (its last heartbeat says so), and it is deleted.
    status, body = api.call("POST", "/api/workers/register", {"workerId": "passing-desktop", "hostname": "passing"})
    assert status == 201, body
    passing = page.locator("#workers tbody tr[data-worker=passing-desktop]")
    expect(passing.locator(".badge").first).to_have_text("online")
    assert worker_heartbeat(farm[0].url, body["token"], status="offline") == 200
    expect(passing.locator(".badge").first).to_have_text("offline")
    assert api.call("DELETE", "/api/workers/passing-desktop")[0] == 200
    expect(passing).to_have_count(0)
    assert asked == [], asked


def test_an_idle_farm_page_asks_the_server_at_most_twice_a_minute(page):
    # The page's clock runs ten minutes in ten-second steps; its requests are real, and answer
    # between the steps. The agent's heartbeats (every 2 s here) keep arriving over the socket.
    page.clock.install()
    open_logged_in(page, "/")
    expect(page.locator(f"#workers tbody tr[data-worker={WORKER_ID}]")).to_be_visible()
    expect(page.locator("#conn")).to_have_text("live")
    page.wait_for_timeout(500)
    asked = requests_of(page)
    minutes = 10

    for _ in range(minutes * 6):
        page.clock.run_for(10_000)
        page.wait_for_timeout(50)

    assert asked, "the page never refreshed"  # it does, as a safety net
    assert len(asked) <= 2 * minutes, f"{len(asked)} requests in {minutes} minutes: {asked}"
    assert {path.split("?")[0] for path in asked} <= {"GET api/workers/list", "GET api/jobs/list", "GET api/health"}
    expect(page.locator("#conn")).to_have_text("live")


def test_ten_tabs_of_one_person_under_a_low_rate_limit_never_get_a_429(browser, tmp_path):
    """Ten farm tabs of one admin against DISPATCH_RATE_LIMIT=60 (the old page spent 48 a minute in
    each tab) while jobs run: none is refused, and once open they ask nothing more."""
    env = dict(server_environment(DISPATCH_HEARTBEAT_INTERVAL="2"), DISPATCH_RATE_LIMIT="60")
    server = ServerProcess(tmp_path / "data", env).start()
    agent = Agent(tmp_path / "desktop", server.url, "tab-desktop")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    refused: list[str] = []
    context.on("response", lambda response: refused.append(response.url) if response.status == 429 else None)
    try:
        api = Api(server.url).login()
        api.wait_for_worker("tab-desktop", agent)
        assert api.call("POST", "/api/users", {"email": "script@example.com", "password": "script-password"})[0] == 201
        script = Api(server.url).login("script@example.com", "script-password")  # the activity, on its own budget
        tabs = [context.new_page() for _ in range(10)]
        open_logged_in(tabs[0])
        for tab in tabs[1:]:
            tab.goto("/")  # the cookie logs it in
        for tab in tabs:
            expect(tab.locator("#conn")).to_have_text("live")
            expect(tab.locator("#workers tbody tr[data-worker=tab-desktop]")).to_be_visible()
        tabs[-1].wait_for_timeout(500)  # the first loads have answered
        page_asked = [requests_of(tab) for tab in tabs]

        jobs = []
        for n in range(10):
            jobs.append(script.submit(f"sleep 0.5; echo job {n}"))
            time.sleep(2)
        for tab in tabs:
            expect(tab.locator(f"#jobs tbody tr[data-href='#/jobs/{jobs[-1]}'] .badge")).to_have_text("completed")

        assert refused == []
        assert [len(asked) for asked in page_asked] == [0] * 10, page_asked
    finally:
        context.close()
        agent.stop()
        server.stop()


def test_an_admin_rotates_the_registration_token_and_deletes_a_desktop_on_the_page(browser, tmp_path):
    env = server_environment(DISPATCH_HEARTBEAT_INTERVAL="2")
    del env["DISPATCH_REGISTRATION_TOKEN"]  # generated into the data dir, so that it may be rotated
    server = ServerProcess(tmp_path / "data", env).start()
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    questions: list[str] = []
    try:
        api = Api(server.url).login()
        old_token = (server.data_dir / "registration_token").read_text().strip()
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.on("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
        open_logged_in(page)

        page.click("#rotate-token")
        expect(page.locator("#new-token")).to_be_visible()
        new_token = page.locator("#new-token-value").input_value()
        assert new_token and new_token != old_token
        assert "stops working" in questions[-1]
        desktop = Api(server.url)
        desktop.token = old_token
        body = {"workerId": "new-desktop", "hostname": "new"}
        assert desktop.call("POST", "/api/workers/register", body)[0] == 401
        desktop.token = new_token
        assert desktop.call("POST", "/api/workers/register", body)[0] == 201
        row = page.locator("#workers tbody tr[data-worker=new-desktop]")
        expect(row.locator(".badge").first).to_have_text("online")  # announced as it registered

        page.click("#copy-token")
        expect(page.locator("#copy-token")).to_have_text("Copied")
        page.click("#hide-token")
        expect(page.locator("#new-token")).to_be_hidden()
        assert page.locator("#new-token-value").input_value() == ""  # shown once

        row.get_by_role("button", name="Delete").click()
        expect(row).to_have_count(0)
        assert "new-desktop" in questions[-1]
        assert api.call("GET", "/api/workers/new-desktop")[0] == 404
    finally:
        context.close()
        server.stop()
    assert not problems, problems


# --- desktops as good guests -----------------------------------------------------------------------


def as_worker(server_url: str, worker_token: str, method: str, path: str) -> dict:
    request = urllib.request.Request(server_url + path, method=method, headers={"x-worker-token": worker_token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def stream_suspended(server_url: str, worker_token: str, job: dict, suspended: bool) -> int:
    request = urllib.request.Request(server_url + "/api/jobs/stream-output", method="POST", data=json.dumps({
        "jobId": job["jobId"], "attempt": job["attempt"], "data": "", "suspended": suspended}).encode(),
        headers={"x-worker-token": worker_token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_an_admin_pauses_and_resumes_a_desktop_on_the_page(page, api):
    open_logged_in(page, "/")
    row = page.locator(f"#workers tbody tr[data-worker={WORKER_ID}]")
    try:
        row.get_by_role("button", name="Pause").click()
        expect(row.locator(".s-paused")).to_have_text("paused")
        expect(row).to_contain_text("paused by an admin")
        job_id = api.submit("echo after the pause", tags=["linux"])
        page.wait_for_timeout(1000)
        assert api.status(job_id)["status"] == "queued"

        row.get_by_role("button", name="Resume").click()
        expect(row.locator(".s-paused")).to_have_count(0)
        expect(row.get_by_role("button", name="Pause")).to_be_visible()
        assert api.wait(job_id)["stdout"] == "after the pause\n"
    finally:
        api.call("POST", "/api/workers/resume", {"workerId": WORKER_ID})


def test_a_suspended_job_shows_so_in_the_table_and_on_its_page_live(page, farm, api):
    status, body = api.call("POST", "/api/workers/register", {"workerId": "guest-desktop", "hostname": "guest",
                                                              "metadata": {"tags": ["guest"]}})
    assert status == 201, body
    token = body["token"]
    job_id = api.submit("make", tags=["guest"])
    job = as_worker(farm[0].url, token, "GET", "/api/jobs/get-job")["job"]
    open_logged_in(page, "/")
    row = page.locator(f"#jobs tbody tr[data-href='#/jobs/{job_id}']")
    expect(row.locator(".badge")).to_have_text("running")

    assert stream_suspended(farm[0].url, token, job, True) == 200
    expect(row.locator(".badge")).to_have_text("suspended")
    page.goto(f"/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("suspended")
    assert stream_suspended(farm[0].url, token, job, False) == 200
    expect(page.locator("#job-status")).to_have_text("running")
    api.call("POST", "/api/jobs/cancel", {"jobId": job_id})
    assert api.call("DELETE", "/api/workers/guest-desktop")[0] == 200
