"""The web client's page and its vendored libraries, served by the HTTP adapter."""

from __future__ import annotations

import re

import httpx

from tests.conftest import REPO


def test_the_page_and_every_library_it_loads_are_served(http: httpx.Client) -> None:
    """`/ui` and each `vendor/...` file the page names are served, with their licenses beside them."""
    page = http.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(vendor/[^"]+)"', page.text)
    assert {a.split("/")[1] for a in assets} == {"marked", "dompurify", "highlight.js", "katex"}
    for asset in assets:
        r = http.get("/" + asset)
        assert r.status_code == 200, asset
        assert r.content == (REPO / asset).read_bytes()
        assert (REPO / asset).parent.joinpath("LICENSE").is_file(), f"{asset} has no license beside it"
    assert "cdn" not in page.text.lower().replace("no cdn", "")


def test_vendor_paths_never_leave_the_folder(http: httpx.Client) -> None:
    """Paths that climb out of vendor/ are refused, never answered with another file."""
    for path in ("/vendor/../llmws.py", "/vendor/%2e%2e/llmws.py", "/vendor/..%2fconfig.json", "/vendor/"):
        r = http.get(path)
        assert r.status_code == 404, path
        assert b"import" not in r.content and b'"security"' not in r.content
