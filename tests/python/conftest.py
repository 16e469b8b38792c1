"""Fixtures for the Python tests: the real `lumen` binary and the mock provider binary,
started on free ports. Binaries come from LUMEN_BIN_DIR (default: <repo>/target/release)."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("LUMEN_BIN_DIR", REPO / "target" / "release"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Mock:
    def __init__(self):
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "lumen-mock-upstream"), "--record", "--threads", "2"],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        self.addr = line.strip().rsplit(" ", 1)[-1]
        self.base_url = f"http://{self.addr}/v1"

    def requests(self):
        with urllib.request.urlopen(f"{self.base_url}/_mock/requests") as r:
            return json.load(r)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Gateway:
    def __init__(self, config_body: str, env=None):
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = tempfile.TemporaryDirectory()
        self.config = Path(self.dir.name) / "lumen.yaml"
        self.config.write_text(
            f'listen: ["127.0.0.1:{self.port}"]\nadmin_listen: "127.0.0.1:{self.admin_port}"\n' + config_body
        )
        self.log = open(Path(self.dir.name) / "lumen.log", "w+")
        self.proc = subprocess.Popen(
            [str(BIN_DIR / "lumen"), "serve", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_http(f"http://127.0.0.1:{self.port}/healthz", proc=self.proc)

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.dir.cleanup()


class Redis:
    """A real `redis-server` on a free loopback port, nothing persisted (as the Rust harness
    starts it)."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                break
            except OSError:
                assert time.time() < deadline, "redis-server did not start"
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def redis_server():
    r = Redis()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mock():
    m = Mock()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: python, key: "sk-client-python" }}
  - {{ id: embed-only, key: "sk-embed-only", models: ["*embed*"] }}
providers:
  mock: {{ base_url: "{mock.base_url}", api_key: "${{MOCK_KEY}}" }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: "*embed*"
    targets: [ {{ provider: mock }} ]
""",
        env={"MOCK_KEY": "sk-provider-python"},
    )
    yield g
    g.stop()
