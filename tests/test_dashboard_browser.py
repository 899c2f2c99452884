"""The dashboard in a real browser: Debian's chromium driven by Playwright for Python (no
browser download). It logs in, sees both models and the simulated GPUs' memory bars, clicks
``Load a`` and sees the model start, at desktop and phone width, with no console error. The
screenshots are kept in the test's temp dir (their paths are printed).

Skipped when chromium or playwright is missing, except in CI (``CI=true``), where that fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cmw_vllm.gateway.settings import GatewaySettings
from tests.conftest import free_port, write_models
from tests.gateway_harness import GatewayThread
from tests.test_gpu_info import FakeGpu, make_fake_nvml

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ADMIN = "adm-browser-" + "k" * 20
GiB = 1024**3


def _browser_or_skip() -> Any:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium; scripts/install.sh does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        message = "the dashboard's browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def _simulated_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 24 GiB GPUs: every running server's API process holds 6 GiB on GPU 0, and
    another program holds 2 GiB on GPU 1."""
    from cmw_vllm.server_record import read_record, record_names

    gpus = [FakeGpu("NVIDIA L4", 24 * GiB, 0), FakeGpu("NVIDIA L4", 24 * GiB, 0)]
    module = make_fake_nvml(gpus)

    def processes(handle: int) -> list[SimpleNamespace]:
        if handle == 1:
            procs = [(os.getppid() or 1, 2 * GiB)]  # not a server's: another program
        else:
            procs = []
            for name in record_names():
                record = read_record(name)
                if record is not None:
                    procs.append((record.pid, 6 * GiB))
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in procs]

    def memory(handle: int) -> SimpleNamespace:
        used = sum(p.usedGpuMemory for p in processes(handle)) + GiB // 2  # and the driver's
        return SimpleNamespace(total=gpus[handle].total, used=used,
                               free=gpus[handle].total - used)

    module.nvmlDeviceGetComputeRunningProcesses = processes  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)


@pytest.fixture
def dashboard(fake_engine: Path, isolated_home: Path, model_dir: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayThread]:
    write_models(isolated_home, {n: {"model": str(model_dir), "port": free_port()}
                                 for n in ("a", "b")})
    _simulated_gpus(monkeypatch)
    gw = GatewayThread(GatewaySettings(port=free_port(), health_interval=0.5,
                                       api_keys=frozenset({"sk-inference"}),
                                       admin_keys=frozenset({ADMIN})))
    yield gw
    gw.close()


def test_the_page_logs_in_shows_models_and_gpus_and_loads_a_model(
        dashboard: GatewayThread, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    from playwright.sync_api import expect

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(f"{dashboard.url}/ui/")
            page.get_by_label("Admin key").fill(ADMIN)
            page.get_by_role("button", name="Log in").click()
            for name in ("a", "b"):
                expect(page.get_by_role("button", name=f"Load {name}", exact=True)) \
                    .to_be_visible(timeout=10_000)
                expect(page.get_by_role("button", name=f"Pin {name}", exact=True)) \
                    .to_be_visible()
            expect(page.locator('.bar[data-gpu="0"]')).to_be_visible(timeout=10_000)
            expect(page.locator('.bar[data-gpu="1"]')).to_be_visible()
            expect(page.locator("#conn")).to_have_text("connected", timeout=10_000)

            page.get_by_role("button", name="Load a", exact=True).click()
            badge = page.locator('.badge[data-name="a"]')
            expect(badge).to_have_text("healthy", timeout=30_000)
            expect(page.get_by_role("button", name="Unload a", exact=True)).to_be_enabled()
            # The server's memory shows in GPU 0's bar, the other program's in GPU 1's.
            expect(page.locator('.bar[data-gpu="0"] .seg-server')).to_have_count(
                1, timeout=15_000)
            expect(page.locator('.bar[data-gpu="1"] .seg-other')).to_have_count(1)
            expect(page.locator('.gpu').first).to_contain_text("6.5 GiB / 24.0 GiB")
            expect(page.locator("#log")).to_contain_text("Starting vLLM server",
                                                         timeout=10_000)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")

            page.set_viewport_size({"width": 390, "height": 844})
            expect(page.get_by_role("button", name="Unload a", exact=True)).to_be_visible()
            overflow = page.evaluate("document.documentElement.scrollWidth")
            phone = tmp_path / "dashboard-phone.png"
            page.screenshot(path=str(phone), full_page=True)
            print(f"dashboard screenshot (phone width): {phone}")
            assert overflow <= 390, f"the page is {overflow}px wide at a 390px viewport"
        finally:
            browser.close()
    assert problems == []
