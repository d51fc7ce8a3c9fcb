"""The gateway package runs without the ML stack, and installs on its own.

Three checks, from cheapest to most real:
- every import in `keywatch_gateway/` is the standard library, the package itself or one
  of its declared HTTP dependencies (so adding `import numpy` fails here, not in a
  customer's gateway);
- `python -m keywatch_gateway.proxy` runs in a process where numpy, pandas,
  scikit-learn, River, Redis and keywatch's own service packages cannot be imported,
  and serves the openai client through it: check, refusal, forwarding, reporting;
- `pip install ./gateway` into a fresh virtualenv pulls in none of them (slow: it
  reaches the package index).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from features.stores.local_server import free_port
from serving.api.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.ops_servers import serve_in_thread
from tests.support.fake_openai import MODEL, FakeOpenAI
from tests.test_proxy import MESSAGES, logged_events

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keywatch_gateway"
ML_AND_SERVICE = ("numpy", "pandas", "sklearn", "scipy", "river", "redis", "pyarrow",
                  "joblib", "matplotlib", "features", "models", "training", "serving")
"""What a gateway must never need: the ML stack, Redis, and keywatch's service code."""


def gateway_dependencies() -> set[str]:
    """Import names of the gateway distribution's declared dependencies."""
    project = tomllib.loads((ROOT / "gateway" / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in
             project["dependencies"]}
    return names | {"anyio", "h11", "httpcore"}  # what httpx and starlette bring


def test_the_gateway_imports_only_the_standard_library_and_its_http_dependencies() -> None:
    allowed = gateway_dependencies() | set(sys.stdlib_module_names) | {"keywatch_gateway"}
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in allowed:
                    found.setdefault(top, set()).add(path.name)
    assert found == {}, f"the gateway imports what it does not declare: {found}"
    assert not set(ML_AND_SERVICE) & gateway_dependencies()


BLOCKED_RUN = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = ["keywatch_gateway.proxy", *sys.argv[1:]]
runpy.run_module("keywatch_gateway.proxy", run_name="__main__")
"""


@pytest.fixture
def proxy_without_ml(tmp_path: Path) -> Iterator[tuple[str, str, object]]:
    """A real keywatch, a fake upstream, and the proxy as a process without the ML stack."""
    keywatch = create_app(make_settings())
    with serve_in_thread(keywatch) as kw_url, serve_in_thread(FakeOpenAI().app()) as up_url:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWATCH_")}
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCKED_RUN.format(blocked=ML_AND_SERVICE),
             "--upstream", f"{up_url}/v1", "--keywatch", kw_url, "--port", str(port),
             "--log-level", "warning"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
            text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the proxy did not start: {proc.communicate()[1][-3000:]}")
                time.sleep(0.05)
            yield url, kw_url, keywatch
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
    assert "ImportError" not in err and "ModuleNotFoundError" not in err, err


def test_the_proxy_runs_with_the_ml_stack_and_service_code_unimportable(
        proxy_without_ml: tuple[str, str, object]) -> None:
    url, kw_url, keywatch = proxy_without_ml
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    httpx.post(f"{kw_url}/admin/bans", headers=admin,
               json={"key": "sk-isolated-banned", "duration": "5m"}).raise_for_status()
    ok = openai.OpenAI(api_key="sk-isolated-ok", base_url=f"{url}/v1", max_retries=0)
    for _ in range(2):
        assert ok.chat.completions.create(model=MODEL, messages=MESSAGES).choices
    streamed = ok.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert sum(1 for _ in streamed) > 3
    banned = openai.OpenAI(api_key="sk-isolated-banned", base_url=f"{url}/v1", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="API key is blocked until"):
        banned.chat.completions.create(model=MODEL, messages=MESSAGES)
    # the process's client reported the calls, usage included (it flushes every 0.5 s)
    from keywatch_gateway.client import KeywatchClient

    idle = KeywatchClient(kw_url)  # nothing buffered here: only waits for keywatch's log
    events = logged_events(keywatch, idle, "sk-isolated-ok", 3)  # type: ignore[arg-type]
    idle.close()
    assert len(events) == 3 and all(e["tokens"] > 0 and e["model"] == MODEL for e in events)


@pytest.mark.slow
def test_the_gateway_distribution_installs_alone_into_a_fresh_virtualenv(
        tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q",
                              str(ROOT / "gateway")], capture_output=True, text=True,
                             timeout=600)
    offline = ("No matching distribution", "Network is unreachable",
               "Failed to establish a new connection", "Temporary failure in name resolution")
    if install.returncode != 0 and any(o in install.stderr for o in offline):
        pytest.skip(f"the package index cannot be reached: {install.stderr[-500:]}")
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", (
        "import importlib.util, sys\n"
        "import keywatch_gateway, keywatch_gateway.proxy, keywatch_gateway.middleware\n"
        f"missing = [m for m in {ML_AND_SERVICE!r} if importlib.util.find_spec(m) is None]\n"
        "print(len(missing))\n")], cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert int(probe.stdout) == len(ML_AND_SERVICE)  # none of them is installed
    help_text = subprocess.run([str(venv / "bin" / "keywatch-proxy"), "--help"],
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "--upstream" in help_text.stdout
