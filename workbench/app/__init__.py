"""The Streamlit dashboard: `launch()` starts `streamlit run` on main.py with a resolved config.

Pages (workbench/app/views/) only edit recipes and submit them as jobs, and read the job store and
result files; see forms.py for the shared form machinery and config.py for the allowed folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from workbench.app.config import ENV, AppConfig

MAIN = Path(__file__).with_name("main.py")


def streamlit_command(host: str, port: int) -> list[str]:
    """The `streamlit run` command line: headless, local, no usage statistics, no file watcher."""
    return [sys.executable, "-m", "streamlit", "run", str(MAIN),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll Streamlit's health endpoint until it answers ok."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start(config: AppConfig, host: str = "127.0.0.1", port: int = 8501,
          **popen_kwargs) -> subprocess.Popen:
    """Start the dashboard server in the background (the e2e test uses this); queued jobs left
    from an earlier session get a worker at once."""
    from workbench.jobs.store import JobStore
    from workbench.jobs.worker import ensure_workers

    store = JobStore(config.db)
    if config.spawn_workers:
        ensure_workers(store, config.max_workers)
    env = {**os.environ, ENV: config.to_json(), "HF_HUB_OFFLINE": os.environ.get(
        "HF_HUB_OFFLINE", "1"), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    return subprocess.Popen(streamlit_command(host, port), env=env, **popen_kwargs)


def launch(host: str = "127.0.0.1", port: int = 8501, config: AppConfig | None = None,
           open_browser: bool = True) -> int:
    """Run the dashboard until Ctrl-C; returns Streamlit's exit status."""
    config = config or AppConfig(home=Path.cwd())
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    proc = start(config, host, port)
    print(f"workbench dashboard: {url}  (job store {config.db}; Ctrl-C stops it, running jobs "
          "go on)", file=sys.stderr)
    if open_browser:
        def _open() -> None:
            if wait_healthy(url, proc=proc):
                import webbrowser

                webbrowser.open(url)
        threading.Thread(target=_open, daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return 130


__all__ = ["AppConfig", "launch", "start", "wait_healthy"]
