"""Make the README's screenshot of the web page: a real server, two real agents, a few jobs.

    python tests/page_screenshot.py [docs/screenshot.png] [--job docs/job.png] [--dark] [--size 390x844]

Needs what the page tests need (Playwright for Python and Debian's chromium). Takes ~15 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, make_zip  # noqa: E402
from page_support import Agent, Api, launch_chromium, start_server  # noqa: E402

# A small project whose scripts print like real builds do (with colours), so the page looks lived in.
PROJECT = {
    "app/build.sh": "echo 'Compiling 48 sources'; sleep 0.3; printf '\\033[32m✔ built\\033[0m dist/app (2.4 MB)\\n'\n",
    "app/test.sh": ("for s in api:61 db:38 ui:43; do printf '\\033[1;32mPASS\\033[0m %s (%s tests)\\n' ${s%:*} ${s#*:}; "
                    "sleep 0.2; done; echo '142 passed in 3.1 s'\n"),
    "app/lint.sh": ("echo 'Linting 48 files'; printf '\\033[31merror\\033[0m src/api/routes.py:88 unused import os\\n' >&2; "
                    "exit 1\n"),
    "app/render.sh": ("i=0; while [ $i -lt 400 ]; do i=$((i+1)); "
                      "printf 'frame %04d  \\033[36m%s\\033[0m  %d ms\\n' $i $(date +%H:%M:%S) $(( (i * 37) % 300 + 200 )); "
                      "sleep 0.4; done\n"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--job", help="also save a running job's page here")
    parser.add_argument("--dark", action="store_true", help="the dark colour scheme")
    parser.add_argument("--size", default="1280x800", help="the window, WIDTHxHEIGHT (default 1280x800)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        server = start_server(folder)
        agents = [Agent(folder / "a", server.url, "build-01", "--tags", "linux,docker", "--concurrency", "2"),
                  Agent(folder / "b", server.url, "render-02", "--tags", "linux,gpu")]
        try:
            api = Api(server.url).login()
            for agent, worker_id in zip(agents, ["build-01", "render-02"]):
                api.wait_for_worker(worker_id, agent)
            url = api.upload(make_zip(PROJECT), "app.zip")
            run = dict(fileUrl=url, workingDirectory="app")
            done = [api.submit("sh build.sh --release", **run, priority="high"),
                    api.submit("sh test.sh", **run),
                    api.submit("sh lint.sh", **run, priority="low")]
            for job_id in done:
                api.wait(job_id)
            cancelled = api.submit("sleep 300", tags=["docker"])
            api.wait(cancelled, until=lambda job: job["status"] == "running")
            api.call("POST", "/api/jobs/cancel", {"jobId": cancelled})
            rendering = api.submit("sh render.sh", **run, tags=["gpu"], timeout=3600)
            api.wait(rendering, until=lambda job: job["status"] == "running")
            api.submit("sh test.sh", **run, tags=["windows"])  # no such worker: it waits in the queue
            api.submit("make docs", tags=["windows"], priority="low")
            time.sleep(3)  # a few frames of output, heartbeats a few seconds old

            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                width, height = map(int, args.size.split("x"))
                context = browser.new_context(viewport={"width": width, "height": height}, base_url=server.url,
                                              color_scheme="dark" if args.dark else "light")
                page = context.new_page()
                page.goto("/")
                page.fill("#login-form [name=email]", ADMIN_EMAIL)
                page.fill("#login-form [name=password]", ADMIN_PASSWORD)
                page.click("#login-form button[type=submit]")
                page.wait_for_selector("#jobs tbody tr >> nth=6")
                page.wait_for_selector("#conn.on")
                page.wait_for_timeout(500)
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.output)
                print(f"saved {args.output}")
                if args.job:
                    page.goto(f"/#/jobs/{rendering}")
                    page.wait_for_selector("#log span")
                    page.wait_for_timeout(2500)
                    page.screenshot(path=args.job)
                    print(f"saved {args.job}")
                browser.close()
            api.call("POST", "/api/jobs/cancel", {"jobId": rendering})
        finally:
            for agent in agents:
                agent.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
