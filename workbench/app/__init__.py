"""The Streamlit dashboard: `launch()` starts `streamlit run` on main.py with a resolved config,
and stops it with its workers and their jobs when the dashboard is stopped (lifecycle.py).

Pages (workbench/app/views/) only edit recipes and submit them as jobs, and read the job store and
result files; see forms.py for the shared form machinery and config.py for the allowed folders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from workbench.app.config import ENV, AppConfig
from workbench.app.lifecycle import (Shutdown, StopRequested, install_console_close_hook,
                                     stop_signals)
from workbench.app.tool_outputs import ToolPublisher
from workbench.jobs.store import JobStore
from workbench.jobs.worker import ensure_workers

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
    store = JobStore(config.db)
    if config.spawn_workers:
        ensure_workers(store, config.max_workers)
    env = {**os.environ, ENV: config.to_json(), "HF_HUB_OFFLINE": os.environ.get(
        "HF_HUB_OFFLINE", "1"), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    return subprocess.Popen(streamlit_command(host, port), env=env, **popen_kwargs)


def launch(host: str = "127.0.0.1", port: int = 8501, config: AppConfig | None = None,
           open_browser: bool = True) -> int:
    """Run the dashboard until it is stopped (Ctrl-C, SIGTERM, a closed terminal or console
    window) or the server exits; then stop the server, its workers and their jobs
    (lifecycle.Shutdown). Returns Streamlit's exit status, or 128+signal / 130 when stopped."""
    config = config or AppConfig(home=Path.cwd())
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    store = JobStore(config.db)
    publisher = (ToolPublisher(store, config.installs()) if config.output_to_tool_folders
                 else None)
    shutdown = Shutdown(None, store)

    def _on_signal(signum, frame):
        raise StopRequested(signum)

    # handlers first: a stop that arrives while the server starts still stops what has started
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, _on_signal) for sig in stop_signals()} if main else {}
    console_hook = install_console_close_hook(shutdown)  # noqa: F841  (kept alive until return)
    status = 0
    try:
        proc = shutdown.server = start(config, host, port)
        print(f"workbench dashboard: {url}  (job store {config.db}; Ctrl-C stops it and its "
              "running jobs)", file=sys.stderr)
        if open_browser:
            def _open() -> None:
                if wait_healthy(url, proc=proc):
                    import webbrowser

                    webbrowser.open(url)
            threading.Thread(target=_open, daemon=True).start()
        while (status := proc.poll()) is None:
            if publisher is not None:
                for line in publisher.poll():
                    print(line, file=sys.stderr)
            time.sleep(0.5)
    except KeyboardInterrupt:
        status = 130
    except StopRequested as e:
        status = 128 + int(e.args[0])
    finally:
        for sig in previous:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        try:
            shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


__all__ = ["AppConfig", "launch", "start", "wait_healthy"]
