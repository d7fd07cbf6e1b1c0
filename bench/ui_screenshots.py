"""What a Dagster user sees of a CLI-built home, in a real browser (issue 20, item 8).

Builds a demo home with the CLI (``icons-dagster demo``; reused when ``--home`` already has a
subset), serves it with ``icons-dagster ui`` on 127.0.0.1, and drives headless Chromium
(Debian's package) with playwright. It saves a screenshot of each page a user looks at first
and asserts what they must find there:

- the asset graph: every ICONS asset, in its group;
- ``selected_subset``: its latest materialization's metadata, with row count, export paths and
  the plots drawn as images;
- a run the CLI launched: its job (not ``__ephemeral_asset_job__``), its assets, its
  invocation tag, and "Re-execute" enabled;
- the whole-graph job ``icons_graph_job`` on its job page.

    apt-get install chromium && pip install -e '.[ui]'
    python bench/ui_screenshots.py --home /tmp/ui-home --out bench/ui   # PNGs + ui.json in --out

Exits 1, naming the page and what was missing, when any assertion fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's package: playwright cannot download its own browser here
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
VIEWPORT = {"width": 1600, "height": 1000}
ICONS_ASSETS = ("training_pool", "warmup_subset", "warmup_checkpoint", "training_gradients", "validation_gradients", "task_influence", "vote_table", "selected_subset")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_home(home: Path, size: str) -> float:
    """The home as a user makes it: ``icons-dagster demo``; seconds taken (0 when reused)."""
    if (home / "exports").is_dir() and any((home / "exports").glob("*subset*.json")):
        return 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icons_dagster.cli", "--home", str(home), "demo", "--size", size], check=True)
    return time.perf_counter() - started


def cli_run(home: Path) -> tuple[str, str, str]:
    """(run id, job name, invocation) of the latest CLI run that materialized selected_subset."""
    from dagster import AssetKey, DagsterInstance

    from icons_dagster.runner import prepare_instance_home
    from icons_dagster.steps import INVOCATION_TAG

    prepare_instance_home(home)
    with DagsterInstance.get() as instance:
        for run in instance.get_runs():  # newest first
            invocation = run.tags.get(INVOCATION_TAG)
            by_cli = invocation is not None and instance.get_run_by_id(invocation) is None  # icons_graph_job's runs name its run
            if by_cli and run.asset_selection and AssetKey("selected_subset") in run.asset_selection:
                return run.run_id, run.job_name, invocation
    raise SystemExit(f"{home}: no CLI run of selected_subset; run `icons-dagster demo --home {home}` first")


def graph_job_steps(home: Path, run_id: str) -> dict[str, int]:
    """How many runs the whole-graph run launched (tagged with its id), and how many succeeded."""
    from dagster import DagsterInstance

    from icons_dagster.steps import INVOCATION_TAG

    with DagsterInstance.get() as instance:
        runs = [run for run in instance.get_runs() if run.tags.get(INVOCATION_TAG) == run_id]
        return {"runs": len(runs), "succeeded": sum(run.is_success for run in runs)}


def serve(home: Path, port: int, log: Path) -> subprocess.Popen:
    """``icons-dagster ui`` on 127.0.0.1:port, up once its server answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "icons_dagster.cli", "--home", str(home), "ui", "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"icons-dagster ui exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    stop(server)
    raise SystemExit(f"the UI did not answer on port {port} in 180 s; see {log}")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def visible_text(page) -> str:
    return page.inner_text("body")


def check(results: dict, page_name: str, condition: bool, what: str) -> None:
    results["checks"].append({"page": page_name, "what": what, "ok": bool(condition)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/ui"))
    parser.add_argument("--size", default="test", help="demo size when the home is built here (default test)")
    args = parser.parse_args()
    home, out = args.home.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    results: dict = {"machine": f"{os.cpu_count()} cores", "home_build_s": round(build_home(home, args.size), 1), "checks": [], "screenshots": {}}
    run_id, job_name, invocation = cli_run(home)
    port = free_port()
    server = serve(home, port, home / "ui-server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport=VIEWPORT)

            def shoot(name: str, url: str, ready: str, height: int = VIEWPORT["height"]) -> str:
                """Open url, wait for ``ready`` on it, save a screenshot, return the page's text."""
                page.set_viewport_size({"width": VIEWPORT["width"], "height": height})  # the UI scrolls inside panes: a tall window shows them whole
                page.goto(base + url)
                page.get_by_text(ready, exact=False).first.wait_for(timeout=120_000)
                page.wait_for_load_state("networkidle")
                dismiss_newsletter()
                save(name)
                return page.inner_text("body")

            def dismiss_newsletter() -> None:
                """The UI's one-time newsletter dialog, which covers the page whenever it opens."""
                skip = page.get_by_role("button", name="Skip")
                try:
                    skip.wait_for(timeout=3_000)
                except PlaywrightTimeout:
                    return
                skip.click()
                skip.wait_for(state="hidden")

            def save(name: str) -> None:
                page.wait_for_timeout(800)  # dialogs fade in: a screenshot mid-way is half transparent
                path = out / f"{name}.png"
                page.screenshot(path=str(path))
                results["screenshots"][name] = path.name

            text = shoot("asset_graph", "/locations/icons_dagster.definitions/asset-groups/icons", "selected_subset")
            labels = text.split()
            for asset in ICONS_ASSETS:  # the graph shortens long names in the middle: validat…_gradients
                shown = any(label == asset or "…" in label and asset.startswith(label.split("…")[0]) and asset.endswith(label.split("…")[1]) for label in labels)
                check(results, "asset_graph", shown, f"shows {asset}")

            text = shoot("selected_subset", "/assets/selected_subset", "Latest materialization", height=3400)
            for field in ("Row count", "Columns", "export_json", "export_parquet", "plot_votes_histogram", "reason"):
                check(results, "selected_subset", field in text, f"shows {field}")
            page.locator("tr", has_text="plot_votes_histogram").get_by_text("[Show Markdown]").first.click()
            image = page.get_by_role("dialog").locator("img[src^='data:image/png']").first
            image.wait_for(timeout=30_000)
            page.wait_for_timeout(1_000)  # the dialog grows in: measure it once it has
            width = image.evaluate("img => img.naturalWidth")
            shown = image.bounding_box() or {"width": 0}
            save("selected_subset_plot")
            check(results, "selected_subset", width >= 800 and shown["width"] >= 800, f"the votes plot opens at full size ({width} px, shown {shown['width']:.0f} px wide)")

            text = shoot("cli_run", f"/runs/{run_id}", "Re-execute")
            check(results, "cli_run", f"Run of {job_name}" in " ".join(text.split()) and "__ephemeral_asset_job__" not in text, f"names its job {job_name}")
            check(results, "cli_run", "vote_table" in text and "selected_subset" in text, "shows its assets")
            reexecute = page.get_by_role("button", name="Re-execute all (*)")
            check(results, "cli_run", reexecute.count() > 0 and reexecute.first.is_enabled(), "Re-execute is enabled")
            page.get_by_role("button", name="View tags and config").click()
            page.get_by_text(invocation).first.wait_for(timeout=30_000)
            save("cli_run_tags")
            check(results, "cli_run", invocation in page.inner_text("body"), f"its tags show icons/invocation={invocation}")

            text = shoot("whole_graph_job", "/locations/icons_dagster.definitions/jobs/icons_graph_job", "materialize_whole_graph")
            check(results, "whole_graph_job", "icons_graph_job" in text and "materialize_whole_graph" in text, "the whole-graph job and its step")
            # launched from its Launchpad as a user does: the daemon dequeues it, a worker runs every step
            shoot("whole_graph_launchpad", "/locations/icons_dagster.definitions/jobs/icons_graph_job/playground", "Launch Run")
            page.get_by_role("button", name="Launch Run").first.click()
            page.wait_for_url("**/runs/**", timeout=60_000)
            started = time.monotonic()
            page.get_by_text("Success", exact=True).first.wait_for(timeout=600_000)
            results["whole_graph_run_s"] = round(time.monotonic() - started, 1)
            dismiss_newsletter()
            save("whole_graph_run")
            graph_run = page.url.rsplit("/", 1)[-1]
            steps = graph_job_steps(home, graph_run)
            check(results, "whole_graph_run", steps["runs"] > 0 and steps["runs"] == steps["succeeded"], f"succeeded, with its {steps['runs']} step runs tagged icons/invocation={graph_run[:8]}…")
            browser.close()
    finally:
        stop(server)
    failed = [c for c in results["checks"] if not c["ok"]]
    results["passed"], results["failed"] = len(results["checks"]) - len(failed), len(failed)
    (out / "ui.json").write_text(json.dumps(results, indent=2) + "\n")
    for c in results["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['page']}: {c['what']}")
    print(f"{results['passed']} passed, {results['failed']} failed; screenshots in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
