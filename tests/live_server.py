"""A live server for the vLLM suite (``tests/vllm``): start a command on a free loopback port,
wait for ``/health``, stop the whole process group after; raw HTTP exchanges and the ``openai``
client against it (import as ``from live_server import ...``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

#: How long a server may take to answer ``/health`` (vLLM compiles and warms up first; minutes
#: on a loaded 2-core machine).
START_TIMEOUT_S = 600


#: The process of each server :func:`running` holds, by base URL.
SERVERS: dict[str, subprocess.Popen] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body=None, *, key: str | None = None,
         headers: dict | None = None, timeout: float = 120):
    """One raw HTTP exchange: ``(status, parsed JSON or the raw bytes)``; ``key`` is sent as
    ``Authorization: Bearer <key>``, ``headers`` as given (they win)."""
    sent = {"content-type": "application/json"}
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def server_env(kv_cache_gib: str = "1", *, drop=(), **extra) -> dict:
    """The test process's environment for a server: without the variables ``drop`` names,
    with ``VLLM_CPU_KVCACHE_SPACE`` (the environment's own value first) and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", kv_cache_gib)
    return {**env, **extra}


def start(cmd: list[str], env: dict, log: Path):
    """Start ``cmd --host 127.0.0.1 --port <free>`` in its own process group, output to
    ``log``, without waiting: ``(process, base URL)``."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait(proc, url: str, log: Path, since: float) -> None:
    """Until ``url/health`` answers 200; fails the test with the log's tail when the server
    exits or :data:`START_TIMEOUT_S` passes (counted from ``since``, a ``time.monotonic()``)."""
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:4]} exited ({proc.returncode}):\n"
                        + log.read_text()[-4000:])
        with contextlib.suppress(OSError):
            if call(url + "/health", timeout=2)[0] == 200:
                return
        if time.monotonic() - since > START_TIMEOUT_S:
            pytest.fail(f"{proc.args[:4]} did not start:\n" + log.read_text()[-4000:])
        time.sleep(2)


def stop(proc) -> None:
    """SIGINT to the server's process group (vLLM's workers included), SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], env: dict, log: Path):
    """:func:`start`, :func:`wait`; yield the base URL; :func:`stop` after."""
    since = time.monotonic()
    proc, url = start(cmd, env, log)
    SERVERS[url] = proc
    try:
        wait(proc, url, log, since)
        print(f"server up in {time.monotonic() - since:.0f} s")
        yield url
    finally:
        SERVERS.pop(url, None)
        stop(proc)


def openai_client(url: str, key: str = "unused", timeout: float = 300):
    """The official client against ``url`` (no retries: every answer counts)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=timeout, max_retries=0)


def group_rss(pgid: int) -> dict[int, int]:
    """Resident memory (``VmRSS``, bytes) of every live process in process group ``pgid``, by
    pid (a server started by :func:`start` leads its own group: the API server, vLLM's engine
    core and its workers)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # the fields after the command name (which may hold spaces and parentheses)
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[int(entry.name)] = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):  # gone meanwhile, or a kernel thread
            continue
    return out


def server_rss(url: str) -> int:
    """The resident memory (bytes) of the server :func:`running` holds at ``url``: the sum of
    :func:`group_rss` over its process group (pages shared between them counted in each)."""
    return sum(group_rss(SERVERS[url].pid).values())
