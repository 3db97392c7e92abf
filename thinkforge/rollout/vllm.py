"""Rollouts on a vLLM server, with the policy's weights pushed after every optimizer step and proven.

    server = VLLMServer(model_dir, cfg, log_path).start()      # or cfg.base_url: a server already running
    gen = VLLMGenerator(server.url, tokenizer, batch_size, cfg, stop_ids=stop_ids, server=server)   # a Sampler
    gen.generate(prompts, n, params)   # token ids in, token ids and their log-probs out
    sync = VLLMSync(gen, policy, sync_dir, atol=cfg.sync_atol)   # a PolicySync: policy = the trainer's functions
    sync.push()                        # LoRA: hot-load the adapter under a new name; full: reload in place
    sync.prove()                       # before the next samples

Token-exact: prompts go to /v1/completions as token ids, completions come back as token ids with the
sampled tokens' log-probs (`return_token_ids`, `logprobs: 0`); nothing is re-tokenised. The server must run
with `--logprobs-mode processed_logprobs` (started here with it) so the log-probs follow the sampling
temperature, as the trainer's do (PITFALLS 5).

Weight sync (PITFALLS 4): every push is a version (pushes since the run started; the server is told it
with /update_weight_version). LoRA adapters are saved (safetensors) and loaded with /v1/load_lora_adapter
under a new name per step (the old one unloaded: a name reused would serve stale cached prefixes); full
weights are saved to a safetensors folder and reloaded in place (/pause, /collective_rpc reload_weights,
/reset_prefix_cache, /resume; VLLM_SERVER_DEV_MODE, loopback only). Before each step's samples `prove`
shows the server holds the trainer's current weights (its version; what the push wrote against the policy
now; the server's own checksums where its layout is the trainer's; the log-probs of a fixed sample within
`rollout.sync_atol`), and every sample carries the version it came from (checked by the trainer): a policy
that did not arrive, or arrived a step late, is an error, never a silently stale generator.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from thinkforge.errors import UserError
from thinkforge.rollout.openai import OpenAIClient, ServerError
from thinkforge.rollout.types import Completion, Policy, SamplingParams, SyncError, encode

BUCKET_BYTES = 2**30  # a push's shard files: at most this much of the model in memory on rank 0 at once


def write_weights(tensors: Iterable, out: Path, *, main: bool = True, bucket_bytes: int = BUCKET_BYTES) -> Path:
    """The (name, tensor) pairs `tensors` as safetensors shards of at most bucket_bytes and their index, written
    by the main rank (the others only iterate: a sharded policy's gathers are collectives). Replaces out's
    shards; returns out."""
    from safetensors.torch import save_file

    if main:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("model*.safetensors*"):
            old.unlink()
    bucket, size, files, index = {}, 0, 0, {}

    def flush():
        nonlocal bucket, size, files
        if main and bucket:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(bucket, str(out / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(bucket, name))
        bucket, size = {}, 0

    for name, t in tensors:
        if main:
            bucket[name] = t.detach().cpu().contiguous().clone()
            size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            flush()
    flush()
    if main:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


def tensor_digest(t) -> str:
    """sha256 of a tensor's bytes, as vLLM's weight checker computes it."""
    import hashlib

    import torch

    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPT_ROOM = 2048  # tokens of prompt the default context leaves beside the stage's new tokens
DEFAULT_CONTEXT = 4096  # at least this (the old default), where the model has it


def context_length(model_dir: str, asked: int | None, max_new_tokens: int | None) -> int:
    """The server's --max-model-len: `asked`, or the larger of 4,096 and the stage's new tokens + PROMPT_ROOM;
    never more than the model's own context (vLLM refuses it: a 1,024-position model failed to start on the
    old fixed default 4,096, and so would Phi-2's 2,048)."""
    config = Path(model_dir) / "config.json"
    if config.is_file():  # a local folder: read it, no code of the model's runs
        positions = json.loads(config.read_text()).get("max_position_embeddings")
    else:
        from transformers import AutoConfig

        positions = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    if asked is not None:
        if positions is not None and asked > positions:
            raise UserError(f"rollout.max_model_len={asked} is more than the model's context ({model_dir}: "
                            f"max_position_embeddings {positions}); set at most {positions}, or leave it unset")
        return asked
    wanted = max(DEFAULT_CONTEXT, (max_new_tokens or 0) + PROMPT_ROOM)
    return min(wanted, positions) if positions is not None else wanted


def decisive_line(log_path: Path) -> str:
    """The line of a failed server's log that says why: its last error line, else its last line. Quoted in the
    error, since a failed start may remove the run folder the log is in."""
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log was written"
    errors = [x for x in lines if "Error" in x or "error:" in x]
    return (errors or lines or ["the log is empty"])[-1][:400]


class VLLMServer:
    """A vLLM OpenAI server as a child process on 127.0.0.1 and a free port: started, waited for, stopped on
    exit and on Ctrl-C (its own process group, so a Ctrl-C reaches us first and we stop it)."""

    def __init__(self, model_dir: str, cfg, log_path: Path, *, lora_rank: int | None = None, dtype: str = "float32",
                 max_new_tokens: int | None = None, owned_dir: Path | None = None):
        """owned_dir: a copy of the starting weights made for this server, removed when it stops."""
        self.model_dir, self.cfg, self.log_path = model_dir, cfg, Path(log_path)
        self.lora_rank, self.dtype, self.owned_dir = lora_rank, dtype, owned_dir
        self.max_model_len = context_length(model_dir, cfg.max_model_len, max_new_tokens)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = shlex.split(self.cfg.vllm_command) + [
            "--model", self.model_dir, "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.dtype, "--logprobs-mode", "processed_logprobs", "--max-model-len", str(self.max_model_len),
            "--seed", "0", "--max-num-batched-tokens", str(self.cfg.max_batched_tokens)]
        if self.lora_rank:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.lora_rank), "--max-loras", "2"]
        return cmd + shlex.split(self.cfg.vllm_args)

    def start(self) -> VLLMServer:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = subprocess.Popen(self.command(), stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        except OSError as e:
            raise UserError(f"cannot start the vLLM server ({self.cfg.vllm_command!r}: {e.strerror}); set rollout.vllm_command "
                            "(e.g. '.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server', see `make vllm`)") from None
        atexit.register(self.stop)
        deadline = time.time() + self.cfg.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise UserError(f"the vLLM server exited with code {self.proc.returncode} while starting: "
                                f"{decisive_line(self.log_path)} (its log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise UserError(f"the vLLM server did not answer /health within {self.cfg.startup_timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            os.killpg(self.proc.pid, signal.SIGCONT)  # a server that stopped answering because it was stopped
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


class VLLMGenerator:
    """The Sampler interface over a vLLM server (see the module docstring). `server` (ours) is stopped by
    `close`; a server at rollout.base_url is the user's and left running. The served name and weight version
    it samples are a policy sync's to move (`VLLMSync`), or a saved adapter's (`load_adapter`)."""

    def __init__(self, url: str, tokenizer, batch_size: int, cfg, *, stop_ids: list[int], server: VLLMServer | None = None):
        """stop_ids: what ends a completion (`types.stop_ids`)."""
        self.url, self.tokenizer, self.batch_size, self.cfg = url.rstrip("/"), tokenizer, batch_size, cfg
        self.stop_ids, self.server = list(stop_ids), server
        self.http = OpenAIClient(self.url, "policy", timeout=cfg.request_timeout, max_retries=0,
                                 concurrency=cfg.concurrency, unreachable="see " + str(server.log_path) if server
                                 else "is rollout.base_url right?")
        self.model_name = "policy"
        self.version = 0  # the weight version it samples: pushes since the run (re)started
        self.told = False  # the server took a version from this run (it then never says "default" again)
        self.probe: list[int] | None = None  # prompt + completion ids of one fixed sample, for the sync check
        self.said: set[str] = set()  # the proofs found off on this server, each said once

    def post(self, route: str, body: dict) -> dict | None:
        """One request to our server. An HTTP error it answers is a RuntimeError (a 500 that says "out of
        memory" is the one the sampler skips and counts); a server that does not answer is one line."""
        try:
            return self.http.post(route, body)
        except ServerError as e:
            if e.status is None:
                raise UserError(f"the vLLM server at {self.url} is unreachable ({e.detail}); {self.http.unreachable}") from None
            raise RuntimeError(f"vLLM {route} answered {e.status}: {e.detail}") from None

    def generate(self, prompts: list, n: int, params: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt by prompt, each with its token ids and their log-probs.

        One request per prompt, its seed the prompt's stream key (`SamplingParams.stream`, the rule every
        backend follows): the samples do not depend on how prompts are batched or spread over ranks. The prompt
        tokens in flight stay within the server's step budget (rollout.max_batched_tokens): vLLM's CPU engine
        fails on a seeded request whose prefill it splits across steps.
        """
        ids = [encode(self.tokenizer, p) for p in prompts]
        longest = max((len(x) for x in ids), default=1)
        in_flight = max(1, min(self.cfg.concurrency, self.cfg.max_batched_tokens // (2 * n * longest)))
        self.same_version("before sampling")
        with ThreadPoolExecutor(in_flight) as pool:
            results = list(pool.map(lambda i: self._complete(ids[i], n, params, i), range(len(ids))))
        self.same_version("while it sampled")  # no push came in between: every sample is of this version
        out = [c for one in results for c in one]
        if self.probe is None and out and out[0].token_ids:
            self.probe = ids[0] + list(out[0].token_ids)
        return out

    def _complete(self, prompt: list[int], n: int, params: SamplingParams, index: int) -> list[Completion]:
        body = {"model": self.model_name, "prompt": [prompt], "n": n, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "logprobs": 0, "return_token_ids": True,
                "seed": params.stream(index) % 2**63, "stop_token_ids": self.stop_ids or None}
        if params.top_k:
            body["top_k"] = params.top_k
        out = []
        for choice in sorted(self.post("/v1/completions", body)["choices"], key=lambda c: c["index"]):
            ids = tuple(choice["token_ids"])
            logprobs = tuple((choice.get("logprobs") or {}).get("token_logprobs") or ())
            text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
            out.append(Completion(index, text, ids, "length" if choice["finish_reason"] == "length" else "stop",
                                  logprobs or None, self.version))
        return out

    def serve(self, name: str, version: int, *, tell: bool = True) -> None:
        """Sample the server's model `name` as weight version `version` from now on (a policy sync's push, a saved
        adapter); tell: the server is told the version too (the rank that pushed)."""
        self.model_name, self.version = name, version
        if tell:
            self.tell_version()

    def tell_version(self) -> None:
        """The server's weight version is this generator's (a server without vLLM's RL API: not told, and said once)."""
        try:
            self.post("/update_weight_version", {"new_version": str(self.version)})
            self.told = True
        except RuntimeError as e:  # a server without vLLM's RL API: its version is not checked (see same_version)
            self.say(f"it refused /update_weight_version ({e}), so its weight version is not checked")

    def say(self, why: str) -> None:
        """Tell once per server that one of the sync's proofs is off, and why."""
        if why not in self.said:
            self.said.add(why)
            warnings.warn(f"the vLLM server at {self.url}: {why} (a server without vLLM's RL API)", stacklevel=3)

    def same_version(self, when: str) -> None:
        """The server's weight version (/weight_info) is this generator's, or SyncError. A server without the
        route (not vLLM's RL API) is not asked."""
        try:
            got = (self.http.get("/weight_info") or {}).get("weight_version")
        except ServerError as e:
            if e.status is None:  # no answer within rollout.request_timeout: one line, as every request
                raise UserError(f"the vLLM server at {self.url} is unreachable ({e.detail}); {self.http.unreachable}") from None
            if e.status != 404:
                raise RuntimeError(f"vLLM /weight_info answered {e.status}: {e.detail}") from None
            self.say("it has no /weight_info, so the weight version it samples is not checked")
            return
        if got == "default" and self.told:  # vLLM's version before any update: a restart lost every push
            raise SyncError(f"the vLLM server at {self.url} reports weight version 'default' {when}, after this run pushed "
                            f"version {self.version}: it was restarted and serves the weights it started with; rerun "
                            "the command (it resumes from the last checkpoint and pushes the policy again)")
        if got is not None and got != "default" and got != str(self.version):
            raise SyncError(f"the vLLM server holds weight version {got} {when}, the trainer pushed version {self.version}: "
                            "a push was lost or another trainer pushes to this server")

    def load_adapter(self, path: str) -> None:
        """Serve a saved LoRA adapter folder (evaluation of a LoRA checkpoint; no trainer to check against)."""
        name = f"policy-{self.version + 1}"
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self.serve(name, self.version + 1, tell=False)

    def close(self) -> None:
        """Stop our server (and drop the copy of the starting weights made for it)."""
        if self.server is not None:
            self.server.stop()
            if self.server.owned_dir is not None:
                shutil.rmtree(self.server.owned_dir, ignore_errors=True)


class VLLMSync:
    """The PolicySync interface over a VLLMGenerator's server: pushes the trainer's `policy` (plain functions,
    `types.Policy`) after every optimizer step and proves the server holds it before the next samples. On
    ranks other than the main one it moves the served name and version with the main rank's pushes and joins
    a sharded policy's collectives; the main rank writes, talks to the server and judges."""

    def __init__(self, sampler: VLLMGenerator, policy: Policy, sync_dir: Path, *, atol: float, dtype: str | None = None,
                 checksums: bool = True):
        """dtype: the server's weights dtype (digests are of the weights in it; None: the trainer's); checksums:
        compare the server's own weight checksums (a server this run started: what it held at the start is known)."""
        self.sampler, self.policy, self.sync_dir, self.atol = sampler, policy, Path(sync_dir), atol
        self.dtype, self.checksums = dtype, checksums
        self.pushed: dict[str, str] | None = None  # digests of what the last push wrote
        self.layout: set[str] | None = None  # weights the server keeps in the trainer's layout (its checksums comparable)

    @property
    def version(self) -> int:
        return self.sampler.version

    def push(self) -> dict[str, float]:
        """Push the trainer's weights as version + 1 (the server is told the number with them); `prove` shows,
        before the next samples, that the server holds them. A sharded policy is gathered a weight at a time
        by every rank and written by the main rank in buckets (`write_weights`). Returns the push's seconds."""
        start, gen, policy = time.time(), self.sampler, self.policy
        version = gen.version + 1
        if not policy.main:  # the main rank pushes the weights every rank holds; the adapter's name follows the version
            gen.serve(f"policy-{version}" if policy.lora else "policy", version, tell=False)
            if policy.collective:  # its shards join the main rank's gathers (digests, then the write)
                self._digests()
                for _ in policy.tensors():
                    pass
            return {}
        self.pushed = self._digests()  # what this push writes, to compare with the policy when it samples
        if policy.lora:
            path = self.sync_dir / f"adapter-{version}"
            policy.save_adapter(path)
            name, old = f"policy-{version}", gen.model_name
            gen.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
            gen.serve(name, version)
            if old != "policy":
                gen.post("/v1/unload_lora_adapter", {"lora_name": old})
                shutil.rmtree(self.sync_dir / f"adapter-{version - 1}", ignore_errors=True)
        else:
            path = write_weights(policy.tensors(), self.sync_dir / "weights")
            gen.post("/pause", {})
            gen.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path.resolve())}})
            gen.post("/reset_prefix_cache", {})
            gen.serve("policy", version)  # with the weights, before generation resumes
            gen.post("/resume", {})
        return {"sync_seconds": time.time() - start}

    def prove(self) -> dict[str, float]:
        """Before sampling, that the server holds exactly the trainer's current weights, three ways (SyncError
        otherwise): its weight version is the last push's; what that push wrote is the policy as it is now (a
        push made before the optimizer step fails here, at whatever learning rate); the server's own per-weight
        checksums (/weight_checker) equal the policy's wherever its layout keeps the trainer's (full weights:
        the norms on the CPU engine, which repacks linear layers and pads embeddings); and, second, the log-probs
        of a fixed sample agree within rollout.sync_atol. Returns the checks' seconds, the share of the
        parameters the server's checksums covered and the log-prob difference. On sharded ranks every rank
        joins the gathers and the probe's forward; the main rank judges."""
        start, policy = time.time(), self.policy
        self.sampler.same_version("before sampling")
        if not policy.main:  # the main rank proves the weights; every rank checks the version it samples
            if policy.collective:
                self._digests()
                self.check()
            return {}
        out = {}
        now = self._digests()
        if self.pushed is not None:
            moved = [n for n in now if self.pushed.get(n) != now[n]]
            if moved:
                raise SyncError(f"weight version {self.version} on the vLLM server is not the trainer's current policy: "
                                f"{len(moved)} of {len(now)} tensors differ from what was pushed (e.g. {moved[0]}); "
                                "the push came before the optimizer step, or the policy changed after it")
        if not policy.lora:
            out["sync_checksum_share"] = self._compare_checksums(now)
        out["sync_logp_diff"] = self.check()
        out["sync_check_seconds"] = time.time() - start
        return out

    def _digests(self) -> dict[str, str]:
        """sha256 of each tensor a push writes (the adapter's, or every weight), in the server's dtype: the
        digests vLLM's /weight_checker computes of its own copy."""
        import torch

        dtype = getattr(torch, self.dtype) if self.dtype else None
        return {n: tensor_digest(t.to(dtype) if dtype is not None else t) for n, t in self.policy.tensors()}

    def _compare_checksums(self, now: dict[str, str]) -> float:
        """The server's per-weight checksums against the policy's digests `now`, SyncError on a difference;
        returns the share of the policy's parameters they cover. Which weights the server keeps in the trainer's
        layout (not repacked, padded or fused) is learned at the first check, when it holds the weights it was
        started on; only those are compared (the CPU engine's checksums of its repacked linear layers do not
        follow a reload: no use). 0 for a server without a checker."""
        if not self.checksums:  # a server this run did not start: what it holds at the first check is not known
            return 0.0
        try:
            served = (self.sampler.post("/weight_checker", {"action": "checksum"}) or {}).get("checksums") or {}
        except RuntimeError as e:  # a server without the RL API
            self.sampler.say(f"it refused /weight_checker ({e}), so its weight checksums are not compared")
            return 0.0
        served = {key.rsplit(":", 1)[-1]: digest for key, digest in served.items()}
        if self.layout is None:  # the server holds the weights this run started it on: the policy's
            self.layout = {n for n in served if now.get(n) == served[n]}
        wrong = [n for n in self.layout if served.get(n) != now.get(n)]
        if wrong:
            raise SyncError(f"the vLLM server's weights are not the trainer's: its checksums of {len(wrong)} of {len(served)} "
                            f"weights disagree with the policy's (e.g. {wrong[0]}): the push did not arrive")
        sizes = self.policy.sizes
        return sum(sizes.get(n, 0) for n in self.layout) / max(sum(sizes.values()), 1)

    def check(self) -> float:
        """max |server - trainer| log-prob over the probe sample's tokens at temperature 1; SyncError above
        rollout.sync_atol. No probe yet (nothing generated): 0."""
        gen, policy = self.sampler, self.policy
        seq = policy.share(gen.probe) if policy.collective else gen.probe  # a collective forward: the main rank's probe
        if seq is None:
            return 0.0
        import torch

        mine = policy.logprobs(seq)  # (T-1,)
        if not policy.main:  # a rank that joined the main rank's forward
            return 0.0
        out = gen.post("/v1/completions", {"model": gen.model_name, "prompt": [seq], "max_tokens": 1,
                                           "temperature": 1.0, "prompt_logprobs": 0})
        served = torch.tensor([next(iter(d.values()))["logprob"] for d in out["choices"][0]["prompt_logprobs"][1:]])
        diff = (served - mine).abs().max().item()
        if not diff <= self.atol:
            raise SyncError(f"after weight sync {self.version} the vLLM server's log-probs differ from the trainer's by "
                            f"{diff:.2e} (> rollout.sync_atol={self.atol}): it is not generating with the new weights")
        return diff
