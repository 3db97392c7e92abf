"""`thinkforge serve` speaks the OpenAI API: the official client, real HTTP, loopback only."""

import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from thinkforge.rollout.hf import HFGenerator
from thinkforge.serve import make_server


@pytest.fixture(scope="module")
def server(tiny_loaded):
    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok), tok, "tiny", port=0, api_key="sekret")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def client(url, key="sekret"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_binds_loopback_by_default(tiny_loaded):
    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok), tok, "tiny", port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_models_and_completions(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=["Mia has", "Leo has"], max_tokens=5, temperature=0, n=2)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_and_stream_agree(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Mia has 3 apples. How many?"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(server):
    c = client(server)
    free = c.completions.create(model="tiny", prompt="Mia has", max_tokens=8, temperature=0).choices[0].text
    stop = next(c for c in free[1:] if not c.isspace())  # a character the greedy text really contains
    cut = c.completions.create(model="tiny", prompt="Mia has", max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.text == free[: free.find(stop)] and cut.finish_reason == "stop"


def test_wrong_key_and_bad_requests(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="tiny", prompt="x", max_tokens=2, top_p=5)


def test_rejected_body_does_not_poison_the_connection(server):
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1})
    conn.request("POST", "/v1/completions", body, {"Authorization": "Bearer wrong", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 401 and r.getheader("Connection") == "close"
    r.read()
    conn.request("GET", "/v1/models", headers={"Authorization": "Bearer sekret"})  # http.client reconnects
    assert conn.getresponse().status == 200
    conn.close()


def test_server_close_ends_idle_keepalive_connections(tiny_loaded):
    import http.client

    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok), tok, "tiny", port=0)
    before = set(threading.enumerate())
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read()  # the connection stays open: its handler thread waits for a next request
    handlers = set(threading.enumerate()) - before - {thread}
    assert handlers
    srv.shutdown()
    thread.join(10)
    t0 = time.time()
    srv.server_close()  # shuts the idle connection down and joins its handler
    assert time.time() - t0 < 10 and not any(t.is_alive() for t in handlers)
    conn.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_as_a_process(tiny_model):
    port = _free_port()
    env = dict(os.environ, THINKFORGE_API_KEY="k2")
    proc = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "-m", tiny_model, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0, timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.3)
        r = c.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].message.content is not None
    finally:
        proc.terminate()
        proc.wait(10)


def test_eval_through_an_openai_compatible_server_writes_what_in_process_eval_writes(tiny_model, tmp_path, capsys):
    """rollout.backend=openai: the model served by its name (here `thinkforge serve` of the same folder);
    greedy completions equal the in-process backend's. RL on such a server is refused (no weight updates)."""
    import json

    from conftest import run_cli

    from thinkforge import models

    model, tok = models.load(tiny_model)
    srv = make_server(HFGenerator(model, tok), tok, tiny_model, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        common = ["eval", "-m", tiny_model, "-b", "synthetic", "--limit", "4", "-t", "0", "--max-new-tokens", "16"]
        assert run_cli([*common, "--out", str(tmp_path / "hf")], capsys)[0] == 0
        code, _, err = run_cli([*common, "--out", str(tmp_path / "srv"), "rollout.backend=openai", f"rollout.base_url={url}"], capsys)
        assert code == 0, err
    finally:
        srv.shutdown()
        srv.server_close()
    rows = {b: [json.loads(x)["completion"] for x in (tmp_path / b / "synthetic.samples.jsonl").read_text().splitlines()]
            for b in ("hf", "srv")}
    assert len(rows["srv"]) == 4 and rows["srv"] == rows["hf"]
    code, _, err = run_cli(["rl", "-m", tiny_model, "--out", str(tmp_path / "rl"), "rollout.backend=openai",
                            f"rollout.base_url={url}"], capsys)
    assert code == 2 and "no weight updates" in err


@pytest.mark.parametrize("where", ["busy", "out_of_range", "foreign_host"])
def test_a_port_or_host_that_cannot_be_served_is_one_line(tiny_model, capsys, where):
    from conftest import run_cli

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        port = {"busy": str(held.getsockname()[1]), "out_of_range": "70000", "foreign_host": "0"}[where]
        host = "192.0.2.1" if where == "foreign_host" else "127.0.0.1"  # TEST-NET-1: never this machine's
        code, _, err = run_cli(["serve", "-m", tiny_model, "--port", port, "--host", host], capsys)
    finally:
        held.close()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot serve on" in err
