"""The web console in a real browser: Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Response,
    expect,
    sync_playwright,
)
from tests.conftest import GatewayProcess, bundled_file, free_port
from tests.integration.test_routing_delivery import StoreSCP
from tests.jwt_tokens import AUDIENCE, ISSUER, SigningKey, hs256_with_public_key, jwks_server

from dicomgate.security.http_auth import hash_api_key, new_api_key

CHROMIUM = "/usr/bin/chromium"
PAGES = {"/ui": "Overview", "/ui/queue": "Queue", "/ui/studies": "Studies"}
PAGES |= {"/ui/routes": "Routes", "/ui/audit": "Audit"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Root in a container has no user namespaces for Chromium's sandbox: --no-sandbox.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # A 4xx page a test asks for is logged as "Failed to load resource"; failed
        # resources are checked below, by response, without the pages themselves.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    def on_response(response: Response) -> None:
        if response.status >= 400 and response.request.resource_type != "document":
            errors.append(f"{response.status} {response.url}")

    page.on("console", on_console)
    page.on("response", on_response)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"browser console errors: {errors}"


def _console_gateway(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> tuple[GatewayProcess, int]:
    """A gateway with a dead PACS (closed port, one attempt) and a de-identifying CT route."""
    monkeypatch.setenv("DEID_SECRET", "ui-test-secret-0123456789")
    pacs_port = free_port()
    overrides: dict[str, Any] = {
        "queue": {"poll_interval": 0.2, "retry": {"max_attempts": 1}},
        "destinations": {
            "pacs": {
                "type": "dimse",
                "host": "127.0.0.1",
                "port": pacs_port,
                "ae_title": "PACS",
                "breaker": {"failures": 0},
            }
        },
        "routes": [
            {
                "name": "ct-deid",
                "match": {"Modality": "CT"},
                "to": ["pacs"],
                "pipeline": [{"deidentify": {"profile": "basic", "secret_env": "DEID_SECRET"}}],
            },
            {"name": "mr-only", "match": {"Modality": "MR", "calling_ae": "MRI*"}, "to": ["pacs"]},
        ],
        **extra,
    }
    return gateway(overrides), pacs_port


def _wait(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def _dead_jobs(gw: GatewayProcess) -> list[dict[str, Any]]:
    _, body = gw.http_get("/api/queue?state=dead")
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_each_page_loads_without_console_errors(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, page: Page
) -> None:
    gw, _ = _console_gateway(gateway, monkeypatch)
    gw.storescu([bundled_file("CT_small.dcm")])
    _wait(lambda: bool(_dead_jobs(gw)))
    for path, title in PAGES.items():
        response = page.goto(gw.url(path))
        assert response is not None and response.status == 200, path
        expect(page.locator("h1")).to_have_text(title)
        expect(page.locator("nav a[aria-current=page]")).to_have_text(title)
    page.goto(gw.url("/ui"))
    expect(page.get_by_role("cell", name="STORESCU")).to_be_visible()
    pacs_row = page.locator("tr", has=page.get_by_role("link", name="pacs"))
    expect(pacs_row).to_contain_text("connection refused")
    page.goto(gw.url("/ui/studies"))
    expect(page.get_by_text("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")).to_be_visible()
    expect(page.locator("td", has_text="pacs: dead 1")).to_be_visible()
    # The overview refreshes itself (every 5 s): the time stamp moves on.
    page.goto(gw.url("/ui"))
    # A screenshot of the overview, kept as a test artifact (CI collects test-artifacts/).
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui-overview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = page.locator(".stamp").inner_text()
    expect(page.locator(".stamp")).not_to_have_text(stamp, timeout=12_000)

    # The audit trail, filtered.
    page.goto(gw.url("/ui/audit"))
    events = page.locator("tbody tr td:nth-child(2)")
    expect(events.filter(has_text="instance.received")).to_have_count(1)
    page.get_by_label("Event").fill("instance.")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"event=instance\."))
    texts = events.all_inner_texts()
    assert texts and all(t.startswith("instance.") for t in texts), texts
    page.get_by_label("Event").fill("")
    page.get_by_label("Outcome").select_option("failure")
    page.get_by_role("button", name="Filter").click()
    outcomes = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert outcomes and set(outcomes) == {"failure"}, outcomes  # the refused delivery
    page.get_by_label("Since").fill("yesterday")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("alert")).to_contain_text("since must be an ISO 8601")


def test_retry_dead_job_from_the_queue_page_delivers_it(
    gateway: Callable[..., GatewayProcess],
    monkeypatch: pytest.MonkeyPatch,
    page: Page,
    tmp_path: Path,
) -> None:
    gw, pacs_port = _console_gateway(gateway, monkeypatch)
    gw.storescu([bundled_file("CT_small.dcm")])
    _wait(lambda: bool(_dead_jobs(gw)))
    job_id = _dead_jobs(gw)[0]["id"]

    page.goto(gw.url("/ui/queue?state=dead"))
    row = page.locator("tr", has=page.get_by_role("link", name=str(job_id), exact=True))
    expect(row).to_contain_text("dead")
    expect(row).to_contain_text("connection refused")

    scp = StoreSCP(tmp_path / "pacs", port=pacs_port).start()
    try:
        row.get_by_role("button", name=f"Retry job {job_id}").click()
        expect(page.get_by_role("status")).to_have_text(f"job {job_id} queued again")

        def delivered() -> bool:
            page.goto(gw.url(f"/ui/queue/{job_id}"))
            return "done" in page.locator("dl.job").inner_text()

        _wait(delivered)
        received = [p for p in (tmp_path / "pacs").iterdir() if p.is_file()]
        assert len(received) == 1
        # The job's own history: the refused attempt, the operator's re-drive, the delivery.
        history = page.locator("table", has=page.locator("caption", has_text="Attempts"))
        rows = history.locator("tbody tr")
        expect(rows).to_have_count(3)
        outcomes = history.locator("tbody tr td:nth-child(2)").all_inner_texts()
        assert outcomes == ["dead", "redriven", "delivered"], outcomes
        expect(rows.nth(0)).to_contain_text("connection refused")
        expect(rows.nth(2).locator("td").nth(5)).to_have_text("")
        page.goto(gw.url("/ui/queue?destination=pacs&state=done"))
        expect(page.locator("tr", has_text="ct-deid")).to_contain_text("done")
    finally:
        scp.stop()


def test_retry_all_dead_and_purge_with_confirmation(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, page: Page
) -> None:
    gw, _ = _console_gateway(gateway, monkeypatch)
    gw.storescu([bundled_file("CT_small.dcm")])
    _wait(lambda: bool(_dead_jobs(gw)))
    page.goto(gw.url("/ui/queue"))
    page.get_by_role("button", name="Retry all dead (1)").click()
    expect(page.get_by_role("status")).to_have_text("1 dead-lettered jobs queued again")
    _wait(lambda: bool(_dead_jobs(gw)))  # the PACS is still down: dead again

    page.goto(gw.url("/ui/queue"))
    purge = page.locator("form[action='/ui/queue/purge']")
    purge.get_by_label("State").select_option("dead")
    purge.get_by_label("I understand").check()
    page.once("dialog", lambda dialog: dialog.dismiss())  # the operator changes their mind
    purge.get_by_role("button", name="Purge").click()
    assert len(_dead_jobs(gw)) == 1
    page.once("dialog", lambda dialog: dialog.accept())
    purge.get_by_role("button", name="Purge").click()
    expect(page.get_by_role("status")).to_have_text("1 dead jobs deleted")
    assert _dead_jobs(gw) == []


def test_dry_run_shows_match_table_and_deidentified_diff(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, page: Page
) -> None:
    gw, _ = _console_gateway(gateway, monkeypatch)
    page.goto(gw.url("/ui/routes"))
    expect(page.locator("table").first).to_contain_text("ct-deid")
    page.locator("#dry-file").set_input_files(str(bundled_file("CT_small.dcm")))
    page.get_by_label("Calling AE").fill("MRI_3T")
    page.get_by_role("button", name="Test the routes").click()

    matches = page.locator("table", has=page.locator("caption", has_text="Match table"))
    expect(matches.locator("tr", has_text="ct-deid")).to_contain_text("matched")
    other = matches.locator("tr", has_text="mr-only")
    expect(other).to_contain_text("not matched")
    expect(other).to_contain_text("does not hold: Modality")
    expect(other.locator("li.ok")).to_contain_text("calling_ae")  # MRI_3T fits MRI*

    diff = page.locator("section.diff table")
    name_row = diff.locator("tr", has_text="PatientName")
    expect(name_row).to_contain_text("CompressedSamples^CT1")
    expect(name_row).to_contain_text("changed")
    expect(name_row).not_to_contain_text(re.compile(r"CompressedSamples.*CompressedSamples"))
    expect(diff.locator("tr", has_text="PatientIdentityRemoved")).to_contain_text("YES")
    assert not list(gw.data.rglob("*.dcm")), "a dry run stores nothing"

    # A stored instance, with the context it arrived with.
    gw.storescu([bundled_file("MR_small.dcm")], "-aet", "MRI_SCANNER")
    _wait(lambda: gw.http_get("/api/queue")[1]["jobs"] != [])
    page.goto(gw.url("/ui/routes"))
    uid = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"
    page.get_by_label("or a stored instance").fill(uid)
    page.get_by_role("button", name="Test the routes").click()
    matches = page.locator("table", has=page.locator("caption", has_text="Match table"))
    expect(matches.locator("tr", has_text="mr-only")).to_contain_text("matched")
    expect(matches.locator("tr", has_text="mr-only")).to_contain_text("MRI_SCANNER")

    page.goto(gw.url("/ui/routes"))
    page.get_by_label("or a stored instance").fill("1.2.3.4")
    page.get_by_role("button", name="Test the routes").click()
    expect(page.get_by_role("alert")).to_have_text("No stored instance has this SOP Instance UID.")


def test_login_with_api_key_and_permissions(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, page: Page
) -> None:
    admin, reader = new_api_key(), new_api_key()
    keys = [
        {"name": "ops", "sha256": hash_api_key(admin), "scopes": ["read", "admin"]},
        {"name": "viewer", "sha256": hash_api_key(reader), "scopes": ["read"]},
    ]
    gw, _ = _console_gateway(gateway, monkeypatch, http={"auth": {"api_keys": keys}})
    page.goto(gw.url("/ui/queue"))
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/queue$"))
    page.get_by_label("API key").fill("dgk_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("This API key is not valid.")
    page.get_by_label("API key").fill(admin)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Queue")
    cookie = next(c for c in page.context.cookies() if c["name"] == "dicomgate_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("h1")).to_have_text("Sign in")

    # A read-only key sees the overview but not the admin pages, as with the API.
    page.get_by_label("API key").fill(reader)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("h1")).to_have_text("Overview")
    assert page.goto(gw.url("/ui/audit")).status == 403  # type: ignore[union-attr]

    # A POST without the form token changes nothing, even with a valid credential.
    with httpx.Client(base_url=gw.url(""), headers={"x-api-key": admin}) as client:
        refused = client.post("/ui/queue/retry-dead", data={"destination": "pacs"})
        assert refused.status_code == 403
        assert client.get("/ui/api/overview").json()["destinations"][0]["destination"] == "pacs"


def test_login_with_an_oidc_token_when_no_api_key_is_configured(
    gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch, page: Page
) -> None:
    """A site on OIDC only signs in with a bearer JWT, checked like one sent to the API."""
    key, stranger = SigningKey.rsa("idp-1"), SigningKey.rsa("idp-other")
    with jwks_server([key]) as idp:
        jwt = {"jwks_url": idp.url, "issuer": ISSUER, "audience": AUDIENCE}
        gw, _ = _console_gateway(gateway, monkeypatch, http={"auth": {"jwt": jwt}})
        now = int(time.time())
        refused = {
            "expired": key.token(scope="read admin", exp=now - 60, iat=now - 600, nbf=now - 600),
            "another audience": key.token(scope="read admin", aud="another-service"),
            "unknown signer": stranger.token(scope="read admin"),
            "HS256 with the public key": hs256_with_public_key(key, scope="read admin"),
        }
        page.goto(gw.url("/ui/queue"))
        expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/queue$"))
        for case, token in refused.items():
            page.get_by_label("API key or access token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            alert = page.get_by_role("alert")
            expect(alert).to_have_text("This access token is not valid or has expired.")
            assert page.locator("h1").inner_text() == "Sign in", case
        page.get_by_label("API key or access token").fill("dgk_not_a_token")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text("This API key is not valid.")

        token = key.token(scope="openid read admin", exp=now + 600)
        page.get_by_label("API key or access token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("h1")).to_have_text("Queue")
        cookie = next(c for c in page.context.cookies() if c["name"] == "dicomgate_session")
        assert cookie["httpOnly"] and cookie["path"] == "/ui"
        assert now + 500 < cookie["expires"] <= now + 601  # dropped when the token expires
        page.goto(gw.url("/ui/audit"))
        expect(page.locator("h1")).to_have_text("Audit")
        page.get_by_role("button", name="Sign out").click()

        # Permissions come from the token's scopes, as on the API: read only, no Queue.
        page.get_by_label("API key or access token").fill(key.token(scope="openid read"))
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("h1")).to_have_text("Overview")
        assert page.goto(gw.url("/ui/queue")).status == 403  # type: ignore[union-attr]
    assert gw.log_count("auth.denied") >= len(refused) + 1
