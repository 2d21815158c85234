"""PNG screenshots of a search in the tools its users open next to slimforge.

Starts ``mlflow ui`` on the search's tracking store and ``optuna-dashboard`` on its Optuna study,
both on 127.0.0.1 and free ports, takes three screenshots with a headless Chromium (Playwright),
and stops both servers:

  mlflow-runs-filtered.png     the experiment's runs table filtered by a technique param
  mlflow-parent-artifacts.png  the search's parent run, artifacts tab (summary.json, pareto.png, ...)
  optuna-dashboard.png         the study in optuna-dashboard (Pareto front and history)
  optuna-trials.png            its trial list, where a trial that broke a budget reads as infeasible

The filter picks the first trial-run param named ``<technique>.<knob>`` (the names the sampler
uses); on a store whose params are still keyed by plan position it falls back to
``step0.technique``.  Rerun the script on a fresh search to refresh the pictures.

Needs ``pip install playwright optuna-dashboard`` and a Chromium: Playwright's own download
(``python -m playwright install chromium``) or a system one (Debian: ``apt-get install chromium``,
found at /usr/bin/chromium, or pass ``--chromium``).

    python benchmarks/screenshots.py --run /tmp/export-run --out docs/screenshots
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

VIEWPORT = {"width": 1400, "height": 850}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(argv: list[str], url: str, timeout_s: float = 180.0):
    """A server process of our own, ready when ``url`` answers; on exit its process group is
    terminated (``mlflow ui`` starts job consumers that outlive a terminated parent)."""
    log("starting: " + " ".join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=2).read(1)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not answer at {url} within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group ignored SIGTERM


def runs_of(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"--experiment: no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([found.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    if not parents:
        raise SystemExit(f"no search (parent) run in experiment {experiment!r}")
    return found.experiment_id, parents[0], trials


def technique_filter(trials) -> str:
    """An MLflow search filter on one technique param that some trial runs have and others lack."""
    from slimforge.core.manager import Plugins

    techniques = set(Plugins().registry.names())
    for run in trials:
        for key, value in sorted(run.data.params.items()):
            if key.split(".", 1)[0] in techniques:
                return f"params.`{key}` = '{value}'"
    for run in trials:  # a store from before params were named by technique
        if "step0.technique" in run.data.params:
            return f"params.`step0.technique` = '{run.data.params['step0.technique']}'"
    raise SystemExit("no trial run has a technique param to filter by")


def study_id(storage: str, study: str | None) -> tuple[int, str]:
    import optuna

    summaries = optuna.get_all_study_summaries(storage)
    chosen = [s for s in summaries if study in (None, s.study_name)]
    if not chosen:
        raise SystemExit(f"--study: no study {study!r} in {storage}; there are {[s.study_name for s in summaries]}")
    summary = chosen[-1]
    return summary._study_id, summary.study_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the search's --out folder (holds optuna.db)")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite:///RUN/mlflow.db, else ./mlflow.db)")
    parser.add_argument("--storage", help="Optuna storage (default sqlite:///RUN/optuna.db)")
    parser.add_argument("--experiment", default="slimforge")
    parser.add_argument("--study", help="study name (default: the last one in the storage)")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--chromium", help="Chromium executable (default: Playwright's, else /usr/bin/chromium)")
    args = parser.parse_args()

    run = args.run.resolve()
    uri = args.tracking_uri or f"sqlite:///{run / 'mlflow.db' if (run / 'mlflow.db').exists() else Path('mlflow.db').resolve()}"
    storage = args.storage or f"sqlite:///{run / 'optuna.db'}"
    experiment_id, parent, trials = runs_of(uri, args.experiment)
    search_filter = technique_filter(trials)
    sid, study = study_id(storage, args.study)
    log(f"experiment {experiment_id}, parent run {parent.info.run_id}, filter {search_filter}; study {study} (id {sid})")
    args.out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    chromium = args.chromium or (None if _playwright_has_chromium() else shutil.which("chromium") or "/usr/bin/chromium")
    mlflow_port, optuna_port = free_port(), free_port()
    mlflow_url, optuna_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{optuna_port}"
    with server([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                 "--port", str(mlflow_port)], mlflow_url), \
            server([shutil.which("optuna-dashboard") or "optuna-dashboard", storage, "--host", "127.0.0.1",
                    "--port", str(optuna_port)], optuna_url), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        experiment = f"{mlflow_url}/#/experiments/{experiment_id}"
        shots = [  # (file, url, text that shows the page has its data, what to do before the picture)
            ("mlflow-runs-filtered.png", f"{experiment}/runs?searchFilter={quote(search_filter)}", "matching runs",
             [close_assistant, model_training_view, expand_parent(parent.info.run_name)]),
            ("mlflow-parent-artifacts.png", f"{experiment}/runs/{parent.info.run_id}/artifacts", "pareto.png",
             [close_assistant, lambda page: page.get_by_text("pareto.png").first.click()]),
            ("optuna-dashboard.png", f"{optuna_url}/dashboard/studies/{sid}", "Pareto Front", []),
            ("optuna-trials.png", f"{optuna_url}/dashboard/studies/{sid}/trials", "Trial 0", []),
            ("optuna-infeasible.png", f"{optuna_url}/dashboard/studies/{sid}", "Pareto Front", [show_history]),
        ]
        for name, url, ready, actions in shots:
            page.goto(url, wait_until="load")
            try:  # a loaded 2-core machine takes tens of seconds for MLflow's first page
                page.get_by_text(ready).first.wait_for(timeout=120_000)
            except Exception as exc:  # playwright's TimeoutError: take the picture of whatever is there
                log(f"{name}: {ready!r} did not appear ({type(exc).__name__})")
            page.wait_for_timeout(1500)
            for action in actions:  # best effort: the UIs change between versions, the picture is still taken
                try:
                    action(page)
                    page.wait_for_timeout(1500)
                except Exception as exc:
                    log(f"{name}: {getattr(action, '__name__', 'action')} failed ({type(exc).__name__}: {exc})")
            page.screenshot(path=str(args.out / name))
            log(f"{args.out / name}: {url}")
        browser.close()
    return 0


def show_history(page) -> None:
    """Scroll the study page to its History plot, which draws the trials that broke a budget (the
    ``constraints`` system attr) as "Infeasible Trial" markers in their own legend entry."""
    page.get_by_text("History").first.scroll_into_view_if_needed()
    page.mouse.wheel(0, 350)


def model_training_view(page) -> None:
    """MLflow 3's sidebar switch (GenAI / Model training) is a per-browser setting that defaults to
    GenAI and is not synced with the experiment's ``mlflow.experimentKind`` tag (mlflow/mlflow
    #24498); a fresh headless browser shows GenAI chrome even for our classic-ML experiment.
    Click it over to Model training, as a user would once."""
    page.get_by_text("Model training", exact=True).first.click(timeout=5000)


def close_assistant(page) -> None:
    """MLflow 3.x opens its chat assistant beside every page, over a third of the table: click
    the last button on its header row (its close button has no label to find it by)."""
    title = page.get_by_text("MLflow Assistant").first
    try:  # it slides in a few seconds after the page
        title.wait_for(timeout=8000)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: no assistant on this version or page
        return
    header = title.bounding_box()
    if header is None:
        return
    middle = header["y"] + header["height"] / 2
    row = [(box["x"], button) for button in page.locator("button").all()
           if (box := button.bounding_box()) and box["x"] > header["x"] and abs(box["y"] + box["height"] / 2 - middle) < 12]
    if row:  # none once it has been closed on an earlier page
        max(row, key=lambda pair: pair[0])[1].click(timeout=3000)


def expand_parent(run_name: str):
    """The filtered trial runs are nested under their search run, which MLflow shows collapsed:
    click the expander just left of the search run's name."""
    def expand(page) -> None:
        box = page.get_by_text(run_name[:20]).first.bounding_box()
        page.mouse.click(box["x"] - 30, box["y"] + box["height"] / 2)
    return expand


def _playwright_has_chromium() -> bool:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        return Path(pw.chromium.executable_path).exists()


if __name__ == "__main__":
    sys.exit(main())
