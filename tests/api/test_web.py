"""The web console in a real browser: Debian's chromium, driven by Playwright, against a real
jobworkerd on 127.0.0.1 with the test PKI's client certificates.

Waits are Playwright's own (each with a timeout); nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from playwright.async_api import Browser, Page, Response, async_playwright, expect

from jobworker.api._proto import jobworker_pb2 as pb
from jobworker.identity import fingerprint

from .conftest import Pki, Running, cert_pool, end_stdin, serving

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("JOBWORKER_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium is installed by ./dev test"
)


@dataclass
class Console:
    api: Running
    browser: Browser
    pages: list[Page] = field(default_factory=list)
    # Every URL a page asked for, to prove none left the server's origin.
    requests: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        assert self.api.server.web is not None
        return f"https://127.0.0.1:{self.api.server.web.port}"

    async def running_job_page(self, user: str = "alice") -> tuple[pb.Job, Page]:
        """A ``sleep 600`` job of ``user``'s, and its page once it shows running."""
        job = await _start(self.api, user, ["sleep", "600"])
        page = await self.page(user)
        await page.goto(f"{self.origin}/jobs/{job.id}")
        await expect(page.locator("#state")).to_have_text("running")
        return job, page

    async def page(self, user: str) -> Page:
        context = await self.browser.new_context(
            # Chromium does not trust the test's CA; the client certificate is what counts.
            ignore_https_errors=True,
            client_certificates=[
                {
                    "origin": self.origin,
                    "certPath": str(self.api.pki.dir / f"{user}.pem"),
                    "keyPath": str(self.api.pki.dir / f"{user}.key"),
                }
            ],
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(WAIT_MS)
        page = await context.new_page()
        page.on("request", lambda request: self.requests.append(request.url))
        self.pages.append(page)
        return page


@contextlib.asynccontextmanager
async def console(tmp_path: Path, pki: Pki, **kw: object) -> AsyncIterator[Console]:
    async with (
        serving(tmp_path, pki, web_listen="127.0.0.1:0", **kw) as api,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield Console(api, browser)
        finally:
            await browser.close()


async def _start(api: Running, user: str, argv: list[str], **spec: Any) -> pb.Job:
    """Any: JobSpec's keyword fields, as protobuf takes them."""
    async with api.client(user) as client:
        request = pb.CreateJobRequest(spec=pb.JobSpec(argv=argv, **spec), start=True)
        job: pb.Job = await client.CreateJob(request, timeout=10)
        return job


async def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


async def test_the_list_shows_ones_jobs_and_follows_them_start_to_end(
    tmp_path: Path, pki: Pki
) -> None:
    async with console(tmp_path, pki) as c:
        bobs = await _start(c.api, "bob", ["sleep", "600"])
        early = await _start(c.api, "alice", ["true"], name="early")
        page = await c.page("alice")
        await page.goto(c.origin + "/")
        rows = page.locator("#jobs tbody tr")
        await expect(rows).to_have_count(1)
        await expect(page.locator(f'tr[data-id="{early.id}"]')).to_contain_text("early")
        await expect(page.locator(f'tr[data-id="{bobs.id}"]')).to_have_count(0)
        # A job started after the page loaded appears, running, then ended; no reload.
        late = await _start(
            c.api,
            "alice",
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=pb.STDIN_MODE_PIPE,
        )
        row = page.locator(f'tr[data-id="{late.id}"]')
        await expect(row.locator(".state")).to_have_text("running")
        # Its CPU and memory, from the sampler, within a refresh or two.
        await expect(row.locator(".mem")).to_have_text(re.compile(r"^\d.* (B|KiB|MiB)$"))
        await expect(row.locator(".cpu")).to_have_text(re.compile(r"^\d+\.\d%$"))
        await _screenshot(page, "list")
        async with c.api.client("alice") as alice:
            await end_stdin(alice, late.id)
        await expect(row.locator(".state")).to_have_text("exited")
        await expect(row.locator("td").nth(5)).to_have_text("0")
        await expect(rows).to_have_count(2)


async def test_a_jobs_output_shows_live_and_its_markup_is_only_text(
    tmp_path: Path, pki: Pki
) -> None:
    echo = (
        "import sys\n"
        "print('<script>document.title=\"pwned\"</script>', flush=True)\n"
        "print('<img src=/x onerror=\"document.title=1\">', flush=True)\n"
        "print('\\x1b[31mred\\x1b[0m plain', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "for line in sys.stdin: print('got', line.strip(), flush=True)\n"
        "sys.stdout.buffer.write(b'cut \\xe2\\x82')\n"
    )
    async with console(tmp_path, pki) as c:
        job = await _start(c.api, "alice", [sys.executable, "-c", echo], stdin=pb.STDIN_MODE_PIPE)
        page = await c.page("alice")
        await page.goto(f"{c.origin}/jobs/{job.id}")
        output = page.locator("#output")
        await expect(output).to_contain_text("red plain")
        # Markup in the output is text: shown as written, and nothing of it ran or loaded.
        await expect(output).to_contain_text('<script>document.title="pwned"</script>')
        await expect(output).to_contain_text('<img src=/x onerror="document.title=1">')
        assert await output.locator("script, img").count() == 0
        assert await page.title() == f"Job {job.id[:8]} · jobworker"
        await expect(output.locator("span.f31")).to_have_text("red")
        # A line written after the page loaded appears without a reload, within 1 s.
        async with c.api.client("alice") as alice:
            call = alice.Attach(timeout=30)
            await call.write(pb.AttachRequest(start=pb.AttachStart(id=job.id, stdin=True)))
            await call.write(pb.AttachRequest(stdin=b"hello\n"))
            await expect(output).to_contain_text("got hello", timeout=1000)
            await call.write(pb.AttachRequest(close_stdin=True))
            await call.done_writing()
            async for _ in call:
                pass
        await expect(page.locator("#output-state")).to_contain_text("all of its output")
        # A character the log ends inside is shown as U+FFFD, not dropped.
        await expect(output).to_contain_text("cut \ufffd")
        await expect(output.locator("span.err")).to_have_text("to stderr\n")
        # One stream alone, for whoever cannot tell the colours apart.
        await page.get_by_label("Show").select_option("stderr")
        await expect(output).to_have_text("to stderr\n")
        await page.get_by_label("Show").select_option("stdout")
        await expect(output).to_contain_text("got hello")
        await expect(output).not_to_contain_text("to stderr")
        assert all(url.startswith(c.origin + "/") for url in c.requests), c.requests
        assert not any(url.endswith("/x") for url in c.requests)


async def test_charts_appear_and_gain_points(tmp_path: Path, pki: Pki) -> None:
    hold = (
        "import sys, time\n"
        "print('\\x1b[1mbuilding\\x1b[0m step 1 of 2', flush=True)\n"
        "held = bytearray(32 << 20)\n"
        "for i in range(0, len(held), 4096): held[i] = 1\n"
        "print('\\x1b[32mok\\x1b[0m: 32 MiB held', flush=True)\n"
        "print('warning: this is stderr', file=sys.stderr, flush=True)\n"
        "sys.stdin.read()\n"
    )
    async with console(tmp_path, pki, runtime={"usage_interval": 0.2}) as c:
        job = await _start(
            c.api,
            "alice",
            [sys.executable, "-c", hold],
            stdin=pb.STDIN_MODE_PIPE,
            limits=pb.Limits(memory_bytes=256 << 20),
        )
        page = await c.page("alice")
        await page.goto(f"{c.origin}/jobs/{job.id}")
        chart = page.locator("#mem-chart")
        await expect(chart.locator("canvas")).to_have_count(1)
        await expect(page.locator("#cpu-chart canvas")).to_have_count(1)
        await expect(chart).to_have_attribute("data-points", re.compile(r"^([2-9]|\d{2,})$"))
        first = await chart.get_attribute("data-points")
        # Points are only ever added: a different count is more.
        await expect(chart).not_to_have_attribute("data-points", first or "")
        await expect(page.locator('dd[data-field="limits"]')).to_contain_text("memory 256 MiB")
        await expect(page.locator("#output")).to_contain_text("this is stderr")
        await expect(chart).to_have_attribute("data-points", re.compile(r"^([89]|\d{2,})$"))
        await _screenshot(page, "job")


async def test_stop_asks_first_then_stops_the_job(tmp_path: Path, pki: Pki) -> None:
    async with console(tmp_path, pki) as c:
        job, page = await c.running_job_page()
        # Keyboard only: the Stop button is reachable by name, and the dialog asks first.
        stop = page.get_by_role("button", name="Stop", exact=True)
        await stop.focus()
        await page.keyboard.press("Enter")
        dialog = page.locator("dialog#confirm")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text("Stop this job?")
        await page.get_by_role("button", name="Cancel").press("Enter")
        await expect(dialog).to_be_hidden()
        async with c.api.client("alice") as alice:
            status = await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)
            assert status.state == pb.JOB_STATE_RUNNING
        await stop.click()
        await page.get_by_role("button", name="Confirm").click()
        await expect(page.locator("#state")).to_have_text("stopped")
        async with c.api.client("alice") as alice:
            status = await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)
            assert status.state == pb.JOB_STATE_STOPPED
        # Remove: asked, then gone, and the list is where it leads.
        await page.get_by_role("button", name="Remove").click()
        await page.get_by_role("button", name="Confirm").click()
        await expect(page).to_have_url(c.origin + "/")
        async with c.api.client("alice") as alice:
            assert not (await alice.ListJobs(pb.ListJobsRequest(), timeout=10)).jobs


async def test_another_users_job_is_not_found_and_not_listed(tmp_path: Path, pki: Pki) -> None:
    async with console(tmp_path, pki) as c:
        alices = await _start(c.api, "alice", ["sleep", "600"])
        bob = await c.page("bob")
        response = await bob.goto(f"{c.origin}/jobs/{alices.id}")
        assert response is not None
        assert response.status == 404
        said = await _problem_of(response)
        nobodys = f"{'0' * 8}-0000-4000-8000-{'0' * 12}"
        unknown = await bob.goto(f"{c.origin}/jobs/{nobodys}")
        assert unknown is not None
        assert unknown.status == 404
        # The same words, but for the id: nothing tells a job of alice's from no job.
        assert alices.id in said
        assert said.replace(alices.id, nobodys) == await _problem_of(unknown)
        for stream in ("", "/output"):
            events = await bob.request.get(f"{c.origin}/events/jobs/{alices.id}{stream}")
            assert events.status == 404
        await bob.goto(c.origin + "/")
        await expect(bob.locator("#summary")).to_contain_text("0 jobs")
        # bob's Stop on alice's job (with his own page's token) is not found either.
        await bob.goto(c.origin + "/new")
        token = await bob.locator('input[name="csrf"]').get_attribute("value")
        refused = await bob.request.post(
            f"{c.origin}/jobs/{alices.id}/stop",
            form={"csrf": token or "", "grace": "0"},
            headers={"Origin": c.origin},
        )
        assert refused.status == 404
        # Only an admin may ask for another owner's list: bob is told so, on the page.
        response = await bob.goto(c.origin + "/?owner=alice")
        assert response is not None
        assert response.status == 403
        await expect(bob.locator(".problem")).to_contain_text("only admins may list")
        # The admin sees both, and may narrow the list to one owner.
        admin = await c.page("admin")
        await admin.goto(c.origin + "/?owner=alice")
        await expect(admin.locator(f'tr[data-id="{alices.id}"]')).to_have_count(1)
        await expect(admin.locator("#summary")).to_contain_text("1 jobs")


async def _problem_of(response: Response) -> str:
    text = await response.text()
    return text.split('<p class="problem" role="alert">')[1].split("</p>", maxsplit=1)[0]


async def test_pages_are_locked_down_and_cross_origin_posts_refused(
    tmp_path: Path, pki: Pki
) -> None:
    async with console(tmp_path, pki) as c:
        job = await _start(c.api, "alice", ["sleep", "600"])
        page = await c.page("alice")
        response = await page.goto(f"{c.origin}/jobs/{job.id}")
        assert response is not None
        headers = await response.all_headers()
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        # A page of another origin posts a form to the console: refused, job untouched.
        attacker = web.Application()
        target = f"{c.origin}/jobs/{job.id}/kill"

        async def lure(_request: web.Request) -> web.Response:
            return web.Response(
                text=f'<form id="f" method="post" action="{target}">'
                '<input name="csrf" value="guess"><button id="go">go</button></form>',
                content_type="text/html",
            )

        attacker.router.add_get("/", lure)
        runner = web.AppRunner(attacker)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            await page.goto(f"http://127.0.0.1:{port}/")
            async with page.expect_response(target) as answer:
                await page.click("#go")
            assert (await answer.value).status == 403
        finally:
            await runner.cleanup()
        await expect(page.locator(".problem")).to_contain_text("cross-site request check")
        # Same origin but no token (as a script elsewhere that forged the Origin could not
        # know it): refused too.
        forms: list[dict[str, str | float | bool]] = [{}, {"csrf": "é"}]
        for form in forms:
            forged = await page.request.post(target, form=form, headers={"Origin": c.origin})
            assert forged.status == 403
        async with c.api.client("alice") as alice:
            status = await alice.GetJob(pb.JobRequest(id=job.id), timeout=10)
            assert status.state == pb.JOB_STATE_RUNNING


async def test_the_start_form_starts_a_job_or_says_what_is_wrong(tmp_path: Path, pki: Pki) -> None:
    async with console(tmp_path, pki) as c:
        page = await c.page("alice")
        await page.goto(c.origin + "/new")
        await page.get_by_label("Command").fill("echo\nhello from the form")
        await page.get_by_label("Memory").fill("lots")
        await page.get_by_role("button", name="Start").click()
        await expect(page.locator(".problem")).to_have_text(
            "memory 'lots' is not a size; use e.g. 256M, 1G or 1048576"
        )
        # What was typed is kept.
        await expect(page.get_by_label("Command")).to_have_value("echo\nhello from the form")
        await page.get_by_label("Memory").fill("64M")
        await page.get_by_label("Environment").fill("GREETING=hi")
        await page.get_by_role("button", name="Start").click()
        await expect(page.locator("#output")).to_contain_text("hello from the form")
        await expect(page.locator('dd[data-field="limits"]')).to_contain_text("memory 64 MiB")
        await expect(page.locator("#state")).to_have_text("exited")


async def test_an_event_stream_ends_when_the_browser_goes(tmp_path: Path, pki: Pki) -> None:
    """A closed page leaves no stream open on the server (its RPC is cancelled)."""
    async with console(tmp_path, pki) as c:
        _, page = await c.running_job_page()
        service = c.api.server.service
        assert service.active_streams > 0
        await page.context.close()
        async with asyncio.timeout(WAIT_MS / 1000):
            await service.no_streams.wait()


def _https_get(port: int, context: ssl.SSLContext, path: str = "/") -> tuple[int, str]:
    """A plain HTTPS GET (in a thread): what a client that is not a browser gets."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _client_tls(pki: Pki, user: str | None, *, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.check_hostname = False
    if user is not None:
        context.load_cert_chain(pki.dir / f"{user}.pem", pki.dir / f"{user}.key")
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


async def test_the_console_takes_only_tls13_with_a_valid_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    bob = fingerprint(x509.load_pem_x509_certificate((pki.dir / "bob.pem").read_bytes()))
    pool = cert_pool(tmp_path, revoked=[bob])
    async with serving(tmp_path, pki, web_listen="127.0.0.1:0", pool=pool) as api:
        assert api.server.web is not None
        port = api.server.web.port
        status, page = await asyncio.to_thread(_https_get, port, _client_tls(pki, "alice"))
        assert status == 200
        assert "alice (user)" in page
        # No certificate: the handshake is refused (TLS 1.3 says so on the first read).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(_https_get, port, _client_tls(pki, None))
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(_https_get, port, _client_tls(pki, "alice", tls12=True))
        # A revoked certificate passes TLS (the CA signed it) but not the service.
        status, page = await asyncio.to_thread(_https_get, port, _client_tls(pki, "bob"))
        assert status == 401
        assert "the client certificate has been revoked" in page
        for path in ("/events/jobs", "/new"):
            status, _ = await asyncio.to_thread(_https_get, port, _client_tls(pki, "bob"), path)
            assert status == 401


async def test_an_oom_kill_is_marked(tmp_path: Path, pki: Pki) -> None:
    grow = "held = []\nwhile True: held.append(bytearray(8 << 20))\n"
    async with console(tmp_path, pki, runtime={"usage_interval": 0.2}) as c:
        job = await _start(
            c.api, "alice", [sys.executable, "-c", grow], limits=pb.Limits(memory_bytes=64 << 20)
        )
        page = await c.page("alice")
        await page.goto(f"{c.origin}/jobs/{job.id}")
        await expect(page.locator("#usage-note")).to_contain_text("OOM killer")
        await expect(page.locator('dd[data-field="exit"]')).to_have_text("OOM killed")
        await _screenshot(page, "oom")


async def test_a_large_output_is_paged_not_loaded_whole(tmp_path: Path, pki: Pki) -> None:
    # 80 bytes each: 6.4 MB. A page ends with the read batch that takes it past 1 MiB, so
    # it can hold well over 1 MiB (under 3, checked below): with 3.2 MB the second page was
    # once the last, and "Jump to the end" never showed (a CI failure). 6.4 MB leaves a
    # third page after two of up to 3 MiB.
    lines = 80_000
    write = f"for i in range({lines}): print(f'line {{i:06d}}', '.' * 67)\n"
    async with console(tmp_path, pki) as c:
        job = await _start(c.api, "alice", [sys.executable, "-c", write])
        async with c.api.client("alice") as alice:
            await alice.WaitJob(pb.JobRequest(id=job.id), timeout=60)
        page = await c.page("alice")
        await page.goto(f"{c.origin}/jobs/{job.id}")
        more = page.locator("#more")
        await expect(more).to_be_visible()
        output = page.locator("#output")
        first = await output.inner_text()
        assert first.startswith("line 000000 ")
        assert 1 << 20 <= len(first) < 3 << 20
        assert f"line {lines - 1:06d}" not in first
        await page.get_by_role("button", name="Load more").click()
        await expect(output).to_contain_text(f"line {len(first) // 80 + 1:06d}")
        # Jump to the end: the last 1,000 lines, and nothing is said to be missing after them.
        await page.get_by_role("button", name="Jump to the end").click()
        await expect(output).to_contain_text(f"line {lines - 1:06d}")
        await expect(page.locator("#output-state")).to_contain_text("all of its output")
        tail = await output.inner_text()
        assert tail.startswith(f"line {lines - 1000:06d} ")


async def test_idle_connections_are_let_go_and_their_number_capped(
    tmp_path: Path, pki: Pki
) -> None:
    """Past TLS, a connection that sends nothing is closed after a while (aiohttp's own
    default keeps it an hour), and past max_connections one is closed at once."""
    async with serving(
        tmp_path, pki, web_listen="127.0.0.1:0", handshake_timeout=1.0, max_connections=2
    ) as api:
        assert api.server.web is not None
        port = api.server.web.port
        context = _client_tls(pki, "alice")
        async with asyncio.timeout(10):
            held = [await asyncio.open_connection("127.0.0.1", port, ssl=context) for _ in range(2)]
            extra, extra_writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            assert await extra.read() == b""  # over the limit: closed at once...
            # ...not for being idle: the two opened before it are still open.
            assert not any(reader.at_eof() for reader, _ in held)
            for reader, _ in held:
                assert await reader.read() == b""  # idle: closed after 3 x 1 s
        # With the idle ones gone, a request is served again.
        status, _ = await asyncio.to_thread(_https_get, port, context)
        assert status == 200
        for writer in (extra_writer, *(w for _, w in held)):
            writer.close()
