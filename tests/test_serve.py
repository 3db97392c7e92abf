"""`thinkforge serve` speaks the OpenAI API: the official client, real HTTP, loopback only."""

import os
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from thinkforge.rollout.hf import HFGenerator
from thinkforge.serve import Settings, make_server


@pytest.fixture(scope="module")
def server(tiny_loaded):
    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok), tok, Settings("tiny", port=0, api_key="sekret"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def client(url, key="sekret"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_binds_loopback_by_default(tiny_loaded):
    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok), tok, Settings("tiny", port=0))
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
    srv = make_server(HFGenerator(model, tok), tok, Settings("tiny", port=0))
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


@pytest.mark.slow
def test_serve_command_as_a_process(tiny_model):
    """On --port 0 the system picks a free port and the start line names it (no free-port race in the test)."""
    env = dict(os.environ, THINKFORGE_API_KEY="k2")
    proc = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "-m", tiny_model, "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # until the start line; the process's end ends the loop
            if line.startswith("serving "):
                break
        found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, line
        port = int(found.group(1))
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0, timeout=30)
        c.models.list()
        r = c.chat.completions.create(model=tiny_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert 1 <= r.usage.completion_tokens <= 4 and isinstance(r.choices[0].message.content, str)
        with pytest.raises(openai.AuthenticationError):  # the key from the environment is the one checked
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
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
    srv = make_server(HFGenerator(model, tok), tok, Settings(tiny_model, port=0))
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


# ---------------------------------------------------------------- what real clients lean on


def _raw(server, method, path, body=None, headers=None, key="sekret"):
    """(status, parsed JSON or None, headers) of one request on a fresh connection."""
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                      **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return r.status, parsed, dict(r.getheaders())


BAD_REQUESTS = [  # (route, body, status, words in the message)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": "abc"}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "n": 65}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "n": True}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "'stop'"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "maximum context length"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),  # was a 500 (RecursionError)
]


@pytest.mark.parametrize("route,body,status,words", BAD_REQUESTS)
def test_each_malformed_request_gets_its_4xx_in_the_openai_shape(server, route, body, status, words):
    got, obj, _ = _raw(server, "POST", route, body)
    assert got == status, obj
    err = obj["error"]
    assert words in err["message"] and err["code"] == status and set(err) == {"message", "type", "param", "code"}


def test_framing_errors_methods_and_routes(server):
    import socket as sock
    from urllib.parse import urlparse

    from thinkforge.serve import http as serve

    assert _raw(server, "POST", "/v1/completions", b"{not json")[0] == 400
    assert _raw(server, "GET", "/v1/completions")[0] == 405
    status, obj, headers = _raw(server, "DELETE", "/v1/models")
    assert status == 405 and headers.get("Allow") == "GET" and obj["error"]["code"] == 405
    assert _raw(server, "PUT", "/v1/chat/completions", {"x": 1})[0] == 405
    assert _raw(server, "POST", "/v1/nothing", {"x": 1})[0] == 404
    # an oversized body is refused from its Content-Length, before it is read
    status, obj, headers = _raw(server, "POST", "/v1/completions", b"{}",
                                {"Content-Length": str(serve.MAX_BODY_BYTES + 1)})
    assert status == 413 and headers.get("Connection") == "close"
    # a body shorter than its Content-Length: 408 after the read timeout, not a hung handler
    u = urlparse(server)
    old, serve.BODY_TIMEOUT_S = serve.BODY_TIMEOUT_S, 0.5
    try:
        with sock.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            chunks = []  # the whole reply, to the close (headers and body can arrive apart on a loaded machine)
            while chunk := s.recv(4096):
                chunks.append(chunk)
            reply = b"".join(chunks).decode()
    finally:
        serve.BODY_TIMEOUT_S = old
    assert reply.startswith("HTTP/1.1 408") and '"code": 408' in reply


def test_unseeded_samples_differ_and_a_seed_repeats(server):
    c = client(server)
    unseeded = {c.completions.create(model="tiny", prompt="Mia has", max_tokens=12, temperature=1.0).choices[0].text
                for _ in range(4)}
    assert len(unseeded) > 1
    seeded = {c.completions.create(model="tiny", prompt="Mia has", max_tokens=12, temperature=1.0, seed=7).choices[0].text
              for _ in range(3)}
    assert len(seeded) == 1


def test_token_id_prompts_and_echo_logprobs_match_a_forward_pass(server, tiny_loaded):
    """What lm-eval's loglikelihood requests send: token ids, max_tokens 1, logprobs 1, echo."""
    model, tok = tiny_loaded
    ids = tok("Mia has 3 apples and", add_special_tokens=False).input_ids
    status, obj, _ = _raw(server, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1,
                           "echo": True, "seed": 1234})
    assert status == 200, obj
    lp = obj["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-5)
    # greedy: the generated token is the argmax, so its log-prob is the top alternative's
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert obj["choices"][0]["text"].startswith(tok.decode(ids))
    # max_tokens 0 with echo scores the prompt alone
    status, obj, _ = _raw(server, "POST", "/v1/completions",
                          {"prompt": ids, "max_tokens": 0, "logprobs": 0, "echo": True})
    assert status == 200 and len(obj["choices"][0]["logprobs"]["tokens"]) == len(ids)


def test_chat_logprobs(server):
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in content)


def test_concurrent_requests_are_batched_and_draw_what_they_draw_alone(tiny_loaded):
    from concurrent.futures import ThreadPoolExecutor

    model, tok = tiny_loaded
    srv = make_server(HFGenerator(model, tok, 64), tok, Settings("tiny", port=0))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        def ask(seed):
            return client(url, "x").completions.create(model="tiny", prompt="Leo has", max_tokens=10, temperature=1.0,
                                                      seed=seed).choices[0].text
        alone = [ask(s) for s in range(8)]
        srv.batcher.batches.clear()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8)))
        assert together == alone
        assert max(srv.batcher.batches) > 1  # some requests shared a batch
        with ThreadPoolExecutor(32) as pool:  # 32 clients connecting at once: none is reset (listen backlog)
            answered = list(pool.map(ask, range(32)))
        assert len(answered) == 32 and all(isinstance(a, str) for a in answered)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_client_that_disconnects_stops_its_generation(tiny_model):
    """One request can no longer hold the model after its client left: the next one is served at once. The
    model here takes 20 ms a step and never stops on its own before 1000 tokens (20 s)."""
    import socket as sock

    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.generation_config.min_new_tokens = 1000
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    lines = []
    srv = make_server(HFGenerator(model, tok), tok, Settings("tiny", port=0), log=lines.append)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]
    try:
        for stream in (False, True):
            payload = b'{"prompt": "Mia has", "max_tokens": 1000, "temperature": 1.0%s}' % (b', "stream": true' if stream else b"")
            s = sock.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            if stream:
                assert s.recv(64)  # the stream started
            time.sleep(0.5)
            s.close()  # the client leaves mid-generation
            t0 = time.time()
            r = client(f"http://127.0.0.1:{port}/v1", "x").completions.create(model="tiny", prompt="Leo", max_tokens=2)
            # at once: not after the abandoned request's 20 s (the margin holds on a loaded 2-core machine)
            assert r.choices[0].text is not None and time.time() - t0 < 10, time.time() - t0
        deadline = time.time() + 5
        while sum("disconnected" in line for line in lines) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert sum("disconnected" in line for line in lines) == 2 and not any("Traceback" in x for x in lines), lines
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_servers_system_prompt_reaches_a_chat_template_model_unless_the_client_sends_one(tiny_loaded):
    """`serve --system-prompt` with a chat-template model was dropped; a client's own system message wins."""
    from thinkforge.formats import render_messages

    _, tok = tiny_loaded
    user = [{"role": "user", "content": "2 + 2?"}]
    assert "Think first." in render_messages(user, tok, "chat_template", "Think first.")
    own = render_messages([{"role": "system", "content": "Mine."}, *user], tok, "chat_template", "Think first.")
    assert "Mine." in own and "Think first." not in own
