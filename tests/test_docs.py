"""The README cannot drift from the code: every setting and every route is documented."""

from __future__ import annotations

import re

import dispatch
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```\n(.*?)\n```", README, re.S)
    run, test = blocks[:2]
    assert run.startswith("python3 -m venv .venv && . .venv/bin/activate")  # a bare pip install is refused on Debian
    assert run.splitlines()[-1] == "pip install -r requirements.txt && python dispatch.py"
    assert test == "pip install -r requirements-dev.txt && python -m pytest"


def test_readme_documents_every_setting_with_its_default():
    table = {row[1].strip("` "): row for row in
             (line.split("|")[1:-1] for line in README.splitlines() if "| `DISPATCH_" in line or "| | `DISPATCH_" in line)}
    for _field, flag, env, _kind, default, _help in dispatch.SETTINGS:
        assert env in table, f"{env} missing from the README's configuration table"
        if flag:
            assert table[env][0].strip() == f"`{flag}`"


def test_readme_documents_every_route(config):
    app = dispatch.create_app(config)
    routes = {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}
    for method, path in routes:
        assert f"`{method} {path}`" in README, f"{method} {path} missing from the README's endpoint list"
