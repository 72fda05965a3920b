"""Shared pieces of the retrieval tests: a small corpus, free ports, real server processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tspo.data.corpus import CorpusDoc, write_corpus

# (title, text, a query whose best answer is this document)
TOPICS = [
    ("Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci.", "mona lisa painter"),
    ("Paris", "Paris is the capital and largest city of France.", "capital of france"),
    ("Mount Everest", "Everest is Earth's highest mountain above sea level.", "highest mountain"),
    (
        "Photosynthesis",
        "Plants turn sunlight, water and carbon dioxide into sugar.",
        "plants sunlight",
    ),
    ("Jupiter", "Jupiter is the largest planet in the Solar System.", "largest planet"),
    (
        "Amazon River",
        "The Amazon in South America carries the most water of any river.",
        "amazon river",
    ),
    (
        "Penicillin",
        "Alexander Fleming discovered penicillin, the first antibiotic.",
        "first antibiotic",
    ),
    (
        "Great Wall",
        "The Great Wall of China is a series of ancient fortifications.",
        "great wall china",
    ),
    ("Violin", "The violin is a bowed string instrument with four strings.", "bowed string violin"),
    ("Chess", "Chess is a board game for two players on a checkered board.", "chess board game"),
    ("Volcano", "A volcano is a rupture in a planet's crust that erupts lava.", "volcano lava"),
    ("Tokyo", "Tokyo is the capital of Japan and its most populous city.", "capital of japan"),
    ("Bicycle", "A bicycle is a pedal-driven two-wheeled vehicle.", "pedal bicycle"),
    ("Honey", "Bees make honey from the nectar of flowers.", "bees honey nectar"),
    ("Saturn", "Saturn is a gas giant known for its prominent ring system.", "planet rings saturn"),
    ("Coffee", "Coffee is a drink brewed from roasted coffee beans.", "roasted coffee beans"),
    (
        "Penguin",
        "Penguins are flightless seabirds of the Southern Hemisphere.",
        "flightless seabirds",
    ),
    ("Shakespeare", "William Shakespeare wrote Hamlet and Romeo and Juliet.", "who wrote hamlet"),
    ("Oxygen", "Oxygen is the chemical element with atomic number 8.", "atomic number 8"),
    ("Olympics", "The Olympic Games are held every four years.", "olympic games"),
]


def corpus_docs() -> list[CorpusDoc]:
    return [CorpusDoc(id=f"d{i}", title=t, text=x) for i, (t, x, _) in enumerate(TOPICS)]


def write_test_corpus(path: Path, docs: list[CorpusDoc] | None = None) -> Path:
    write_corpus(docs if docs is not None else corpus_docs(), path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(base_url: str, process: subprocess.Popen | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{process.stderr.read().decode()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} did not come up within {timeout}s")


@contextmanager
def tspo_server(index_dir: Path, *extra_args: str, env: dict | None = None) -> Iterator[str]:
    """Run ``tspo serve`` as a real process on a free loopback port; yield its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "tspo.cli", "serve", "--index", str(index_dir)]
    command += ["--port", str(port), *extra_args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ScriptedServer:
    """A real HTTP server answering ``POST /retrieve`` from a script of (status, JSON body) or
    (status, JSON body, headers).

    It speaks the Search-R1 reference server's JSON, which we cannot run here (it needs its own
    e5 index); once the script runs out it repeats the last entry.
    """

    def __init__(self, script: list[tuple]):
        self.script = list(script)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length", 0))
                server.requests.append(json.loads(self.rfile.read(length)))
                entry = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                status, body, headers = (*entry, {})[:3]
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/retrieve"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@contextmanager
def app_server(app: object) -> Iterator[str]:
    """Serve an ASGI ``app`` with a real uvicorn on a free loopback port, in a thread.

    For faults that need a hand inside the server (a retriever that blocks, fails or kills the
    batch worker); the HTTP side is the same as ``tspo serve``'s.
    """
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"in-process server on port {port} did not start")
            time.sleep(0.02)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
