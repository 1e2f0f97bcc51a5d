"""Several processes on loopback: torchrun, explicit master, failures, and asynchronous workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from torchslim import checkpoint, losses
from torchslim.learning import create_train_op, train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# One script for every multi-process test. argv: logdir target batch_size [options as KEY=VALUE]
SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from safetensors.torch import save_file
    from torchslim import learning, losses

    logdir, target, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opts = dict(a.split("=", 1) for a in sys.argv[4:])
    rank = int(os.environ.get("RANK", opts.get("rank", 0)))
    torch.manual_seed(100 + rank)  # different on purpose: train() must make the processes start equal
    g = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(512, 8, generator=g), torch.randint(0, 3, (512,), generator=g)
    own = torch.Generator().manual_seed(7) if "generator" in opts else None  # the loader's own shuffle generator
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle="shuffle" in opts, generator=own)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, int(opts.get("classes", 3))))

    class WithSpare(torch.nn.Module):  # a parameter the loss never uses
        def __init__(self, net):
            super().__init__()
            self.net, self.spare = net, torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.net(x)

    class Blocks(torch.nn.Module):  # a transformer's layout: blocks in a ModuleList (which has no forward)
        def __init__(self, classes):
            super().__init__()
            self.embed = torch.nn.Linear(8, 16)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
            self.head = torch.nn.Linear(16, classes)

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = x + torch.tanh(block(x))
            return self.head(x)

    if "extra" in opts:
        model = WithSpare(model)
    if "blocks" in opts:
        model = Blocks(int(opts.get("classes", 3)))
    call = model.net if opts.get("extra") == "inner" else model  # inner: the loss calls a submodule only
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"

    def total_loss(batch):
        step = op.step
        if opts.get("kill_rank") == str(rank) and step == int(opts["kill_at"]) and not restarted:
            os.kill(os.getpid(), 9)
        if opts.get("raise_rank") == str(rank) and step == int(opts["raise_at"]):
            raise ValueError(f"bad batch at step {step}")
        if opts.get("mark_at") and step == int(opts["mark_at"]):
            open(f"{logdir}.rank{rank}.mark", "w").close()
        if opts.get("slow"):
            time.sleep(float(opts["slow"]))
        x, y = batch
        losses.sparse_softmax_cross_entropy(call(x), y)
        total = losses.get_total_loss()
        seen.append(total.item())
        return total

    seen = []

    dtypes = set()  # the dtype of the first layer's weight as its forward pass sees it
    first_layer = model.net[0] if "extra" in opts else model.embed if "blocks" in opts else model[0]
    first_layer.register_forward_pre_hook(lambda m, args: dtypes.add(str(m.weight.dtype)))
    op = learning.create_train_op(total_loss, optimizer, model=model, precision=opts.get("precision", "fp32"))
    op.accumulate_steps = int(opts.get("accumulate", 1))
    kwargs = {k: int(opts[k]) for k in ("rank", "world_size") if k in opts}
    if "fsdp" in opts:
        kwargs["sharding"] = "fsdp"
    if "kill_in_save" in opts and not restarted:  # RANK:STEP: that rank dies (kill -9) while writing its shards
        kill_rank, kill_step = map(int, opts["kill_in_save"].split(":"))
        if rank == kill_rank:
            from torchslim import _tensorfile
            real_write = _tensorfile.write

            def dying_write(path, tensors, **kw):
                if f"model.ckpt-{kill_step}" in path:
                    with open(path, "wb") as f:
                        f.write(bytes(4096))
                        f.flush()
                    os.kill(os.getpid(), 9)
                return real_write(path, tensors, **kw)

            _tensorfile.write = dying_write
    learning.train(op, logdir, loader, number_of_steps=target, save_interval_steps=int(opts.get("save_every", 10)),
                   save_summaries_steps=5, master=opts.get("master"), progress_bar=False, **kwargs)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: what this process holds
    held = {"losses": seen, "dtypes": sorted(dtypes), "params_full": sum(p.numel() for p in model.parameters()),
            "params_local": sum(local(p).numel() for p in model.parameters()),
            "optimizer_local": sum(local(t).numel() for s in optimizer.state.values() for t in s.values()
                                   if isinstance(t, torch.Tensor) and t.ndim > 0)}
    with open(f"{logdir}.rank{rank}.json", "w") as f:
        json.dump(held, f)
    if "fsdp" not in opts:  # a sharded model's weights are in its final checkpoint
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{logdir}.rank{rank}.safetensors")
    print(f"rank {rank} done at step {op.step}", flush=True)
''')


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def script(tmp_path: Path) -> str:
    path = tmp_path / "job.py"
    path.write_text(SCRIPT)
    return str(path)


def torchrun(tmp_path, logdir, target, batch, *opts, nproc=2, extra=(), timeout=120):
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *extra, script(tmp_path), str(logdir), str(target),
           str(batch), *opts]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def explicit(tmp_path, logdir, target, *opts):
    """Two processes joined through master= with explicit rank and world_size (no torchrun)."""
    master = f"tcp://127.0.0.1:{free_port()}"
    return [subprocess.Popen([sys.executable, script(tmp_path), str(logdir), str(target), "32", f"master={master}",
                              f"rank={r}", "world_size=2", *opts], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in (0, 1)]


def weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_two_processes_of_batch_32_match_one_process_of_batch_64(tmp_path):
    single = subprocess.run([sys.executable, script(tmp_path), str(tmp_path / "one"), "24", "64"], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    pair = torchrun(tmp_path, tmp_path / "two", 24, 32)
    assert pair.returncode == 0, pair.stderr
    one, rank0, rank1 = (weights(f"{tmp_path}/{n}.safetensors") for n in ("one.rank0", "two.rank0", "two.rank1"))
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the two processes differ"
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-5, atol=1e-6)
    # Only the chief wrote: one event file, checkpoints at the chief's steps.
    events = [n for n in os.listdir(tmp_path / "two") if n.startswith("events")]
    assert len(events) == 1
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path / "two")] == [10, 20, 24]


def single(tmp_path, logdir, target, batch, *opts):
    return subprocess.run([sys.executable, script(tmp_path), str(logdir), str(target), str(batch), *opts], env=env(),
                          capture_output=True, text=True, timeout=120)


def assert_same_run(one: dict, rank0: dict, rank1: dict) -> None:
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the two processes differ"
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_past_epoch_boundaries_a_loader_with_its_own_generator_shuffles_as_in_one_process(tmp_path):
    # 512 examples: an epoch is 8 updates of 64; 20 updates cross two epoch boundaries.
    alone = single(tmp_path, tmp_path / "one", 20, 64, "shuffle=1", "generator=1")
    assert alone.returncode == 0, alone.stderr
    pair = torchrun(tmp_path, tmp_path / "two", 20, 32, "shuffle=1", "generator=1")
    assert pair.returncode == 0, pair.stderr
    assert_same_run(*(weights(f"{tmp_path}/{n}.safetensors") for n in ("one.rank0", "two.rank0", "two.rank1")))


@pytest.mark.slow
def test_two_processes_accumulating_two_micro_batches_of_16_match_one_process_of_64(tmp_path):
    alone = single(tmp_path, tmp_path / "one", 12, 64)
    assert alone.returncode == 0, alone.stderr
    pair = torchrun(tmp_path, tmp_path / "two", 12, 16, "accumulate=2")
    assert pair.returncode == 0, pair.stderr
    assert_same_run(*(weights(f"{tmp_path}/{n}.safetensors") for n in ("one.rank0", "two.rank0", "two.rank1")))
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path / "two")) == 12


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["spare", "inner"])
def test_an_unused_parameter_or_a_loss_calling_only_a_submodule_still_matches_one_process(tmp_path, extra):
    alone = single(tmp_path, tmp_path / "one", 12, 64, f"extra={extra}")
    assert alone.returncode == 0, alone.stderr
    pair = torchrun(tmp_path, tmp_path / "two", 12, 32, f"extra={extra}")
    assert pair.returncode == 0, pair.stderr
    one, rank0, rank1 = (weights(f"{tmp_path}/{n}.safetensors") for n in ("one.rank0", "two.rank0", "two.rank1"))
    assert "spare.weight" in one and "net.0.weight" in one
    assert_same_run(one, rank0, rank1)
    assert ("gradients are averaged after it instead" in pair.stderr) == (extra == "inner")


def two_nodes(tmp_path, target, nodes, *opts, succeed=True):
    """Two torchrun agents (--nnodes=2, c10d rendezvous on loopback), each in its own directory, logdir "run".

    The relative logdir stands for a logdir on each machine's own disk: the path
    the chief finds does not exist for the other node. Node addresses sort so
    that the first directory's node gets rank 0.
    """
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node, addr in zip(nodes, ("127.0.0.1", "127.0.0.2")):
        node.mkdir(exist_ok=True)
        cmd = [TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
               "--rdzv-id=nodes", f"--local-addr={addr}", script(tmp_path), "run", str(target), "32", "shuffle=1",
               *opts]
        procs.append(subprocess.Popen(cmd, cwd=node, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert (p.returncode == 0) == succeed, err
    return [err for _, err in outputs]


@pytest.mark.slow
def test_two_nodes_with_a_logdir_each_resume_from_the_chief_s_checkpoint_by_broadcast(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    two_nodes(tmp_path, 10, nodes)
    assert checkpoint.step_of(checkpoint.latest_checkpoint(nodes[0] / "run")) == 10
    assert checkpoint.latest_checkpoint(nodes[1] / "run") is None  # only the chief writes, on its own disk
    errors = two_nodes(tmp_path, 20, nodes)
    assert "Rank 1 cannot read run/model.ckpt-10" in errors[1] and "receiving the checkpoint from the chief" in errors[1]
    # The same as one uninterrupted run on one machine: rank 1 got the weights, optimizer, data position and RNG.
    straight = torchrun(tmp_path, tmp_path / "straight", 20, 32, "shuffle=1")
    assert straight.returncode == 0, straight.stderr
    expected = weights(f"{tmp_path}/straight.rank0.safetensors")
    rank0, rank1 = weights(nodes[0] / "run.rank0.safetensors"), weights(nodes[1] / "run.rank1.safetensors")
    for name in expected:
        assert torch.equal(rank0[name], rank1[name]) and torch.equal(rank0[name], expected[name]), name


def held(prefix) -> dict:
    import json

    return json.loads(Path(f"{prefix}.json").read_text())


def final_weights(logdir) -> dict:
    latest = checkpoint.latest_checkpoint(logdir)
    assert checkpoint.read_metadata(latest)["final"] is True
    return checkpoint.load(latest)["model"]


@pytest.mark.slow
def test_fsdp_follows_the_loss_curve_of_ddp_and_of_one_process_holding_half_the_state_each(tmp_path):
    alone = single(tmp_path, tmp_path / "one", 20, 64, "classes=4")
    assert alone.returncode == 0, alone.stderr
    for name, opts in (("ddp", ()), ("fsdp", ("fsdp=1",))):
        run = torchrun(tmp_path, tmp_path / name, 20, 32, "classes=4", *opts)
        assert run.returncode == 0, run.stderr
    one = held(tmp_path / "one.rank0")["losses"]
    assert len(one) == 20
    for name in ("ddp", "fsdp"):  # the loss of a batch of 64 is the mean of its two halves' losses
        ranks = [held(tmp_path / f"{name}.rank{r}")["losses"] for r in (0, 1)]
        torch.testing.assert_close(torch.tensor(ranks).mean(0), torch.tensor(one), rtol=1e-5, atol=1e-6)
    expected = final_weights(tmp_path / "ddp")
    sharded = final_weights(tmp_path / "fsdp")
    # Each process wrote its rows of every checkpoint; the chief committed them (state.json lists both files).
    latest = checkpoint.latest_checkpoint(tmp_path / "fsdp")
    assert sorted(os.listdir(latest)) == ["state.json", "tensors-rank0-of-2.safetensors",
                                          "tensors-rank1-of-2.safetensors"]
    assert "sharded over 2 processes" in checkpoint.describe(latest)
    assert list(sharded) == list(expected)  # the user's model's names, whole tensors
    for name in expected:
        torch.testing.assert_close(sharded[name], expected[name], rtol=1e-5, atol=1e-6)
    # `torchslim export` makes it one safetensors file for the plain model.
    from safetensors.torch import load_file

    from torchslim import cli

    assert cli.main(["export", str(tmp_path / "fsdp"), str(tmp_path / "fsdp.safetensors")]) == 0
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    plain.load_state_dict(load_file(str(tmp_path / "fsdp.safetensors")))
    assert all(torch.equal(plain.state_dict()[k], sharded[k]) for k in sharded)
    for r in (0, 1):
        counts = held(tmp_path / f"fsdp.rank{r}")
        assert abs(counts["params_local"] / counts["params_full"] - 0.5) <= 0.05, counts
        assert abs(counts["optimizer_local"] / counts["params_full"] - 0.5) <= 0.05, counts  # SGD's momentum
    assert held(tmp_path / "ddp.rank1")["params_local"] == held(tmp_path / "ddp.rank1")["params_full"]


@pytest.mark.slow
def test_fsdp_in_bf16_gathers_bf16_parameters_and_follows_ddp_in_bf16(tmp_path):
    for name, opts in (("ddp", ()), ("fsdp", ("fsdp=1",)), ("fsdp16", ("fsdp=1", "precision=fp16"))):
        run = torchrun(tmp_path, tmp_path / name, 20, 32, *(opts if name == "fsdp16" else (*opts, "precision=bf16")))
        assert run.returncode == 0, run.stderr
    ddp, fsdp = held(tmp_path / "ddp.rank0"), held(tmp_path / "fsdp.rank0")
    assert "torch.bfloat16" in fsdp["dtypes"] and ddp["dtypes"] == ["torch.float32"]  # gathered in bf16 / autocast
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=2e-2, atol=2e-2)
    assert fsdp["losses"][-1] < fsdp["losses"][0]
    saved = final_weights(tmp_path / "fsdp")
    assert all(t.dtype == torch.float32 for t in saved.values())  # the shards and checkpoints stay fp32
    assert "torch.float16" in held(tmp_path / "fsdp16.rank1")["dtypes"]
    meta = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "fsdp16"))
    assert meta["precision"]["scaler"]["scale"] > 0  # the loss scaler's state is checkpointed


@pytest.mark.slow
def test_fsdp_shards_each_block_of_a_module_list_and_follows_ddp(tmp_path):
    for name, opts in (("ddp", ()), ("fsdp", ("fsdp=1",))):
        run = torchrun(tmp_path, tmp_path / name, 10, 32, "blocks=1", *opts)
        assert run.returncode == 0, run.stderr
    ddp, fsdp = held(tmp_path / "ddp.rank0"), held(tmp_path / "fsdp.rank0")
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    assert abs(fsdp["params_local"] / fsdp["params_full"] - 0.5) <= 0.05, fsdp


INF_IN_ONE_SHARD = textwrap.dedent('''
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchslim._precision import LossScaling
    dist.init_process_group("gloo")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    optimizer, scaling = torch.optim.SGD(model.parameters(), lr=0.1), LossScaling("cpu")
    scaling.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
    if dist.get_rank() == 1:  # an Inf in rank 1's shard of the gradient only
        model[0].weight.grad.to_local()[0, 0] = float("inf")
    before = model[0].weight.to_local().clone()
    scaling.unscale_(optimizer)
    stepped = scaling.step(optimizer)
    print(f"rank {dist.get_rank()} stepped={stepped} changed={not torch.equal(before, model[0].weight.to_local())}")
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_under_fp16_an_inf_in_one_process_s_gradient_shard_skips_the_update_on_every_process(tmp_path):
    path = tmp_path / "inf.py"
    path.write_text(INF_IN_ONE_SHARD)
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(path)], env=env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for rank in (0, 1):
        assert f"rank {rank} stepped=False changed=False" in run.stdout, run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("fsdp", "one"), ("one", "fsdp")])
def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, first, then):
    # The same 64 examples per update either way: 2 processes x 32, or 1 process accumulating 2 x 32.
    def run(logdir, target, how):
        if how == "one":
            return single(tmp_path, logdir, target, 32, "accumulate=2")
        return torchrun(tmp_path, logdir, target, 32, "fsdp=1")

    straight = run(tmp_path / "straight", 20, "one")
    assert straight.returncode == 0, straight.stderr
    for target, how in ((10, first), (20, then)):
        result = run(tmp_path / "run", target, how)
        assert result.returncode == 0, result.stderr
    assert "Restored run/model.ckpt-10" in result.stderr.replace(str(tmp_path) + "/", "")
    expected, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "run")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    losses_after = held(tmp_path / "run.rank0")["losses"]
    straight_losses = held(tmp_path / "straight.rank0")["losses"]
    if then == "one":  # its losses are those of 32 examples each, as the straight run's
        torch.testing.assert_close(torch.tensor(losses_after), torch.tensor(straight_losses[20:]), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.slow
def test_a_rank_killed_while_writing_its_shards_leaves_the_previous_checkpoint_the_newest(tmp_path):
    died = torchrun(tmp_path, tmp_path / "run", 30, 32, "fsdp=1", "kill_in_save=1:20")
    assert died.returncode != 0
    logdir = tmp_path / "run"
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(logdir)] == ["model.ckpt-10"]
    assert checkpoint.read_metadata(logdir / "model.ckpt-10")["format"] == "torchslim.checkpoint/3"
    checkpoint.load(logdir / "model.ckpt-10")  # every file checks out
    # The next run resumes from it, removes what the dead save left, and reaches the target.
    resumed = torchrun(tmp_path, logdir, 30, 32, "fsdp=1")
    assert resumed.returncode == 0, resumed.stderr
    assert "Restored run/model.ckpt-10" in resumed.stderr.replace(str(tmp_path) + "/", "")
    assert checkpoint.step_of(checkpoint.latest_checkpoint(logdir)) == 30
    assert not [n for n in os.listdir(logdir) if n.startswith(".model.ckpt")]


@pytest.mark.slow
def test_fsdp_on_nodes_that_do_not_share_the_logdir_refuses_to_start_naming_the_rank(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    errors = two_nodes(tmp_path, 10, nodes, "fsdp=1", succeed=False)
    assert "must be one directory that every process sees" in errors[0]
    assert f"rank 1 on host {socket.gethostname()} (logdir {nodes[1] / 'run'})" in errors[0]
    assert checkpoint.latest_checkpoint(nodes[0] / "run") is None


@pytest.mark.slow
def test_a_shuffled_loader_is_split_not_duplicated_and_a_resume_restores_every_process(tmp_path):
    first = torchrun(tmp_path, tmp_path / "run", 10, 32, "shuffle=1")
    assert first.returncode == 0, first.stderr
    again = torchrun(tmp_path, tmp_path / "run", 20, 32, "shuffle=1")
    assert again.returncode == 0, again.stderr
    rank0, rank1 = (weights(f"{tmp_path}/run.rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "run"))
    assert state["global_step"] == 20
    assert (state["data"]["epoch"], state["data"]["batch"]) == (2, 8)  # 16 batches of 32 per epoch, 2 per step


@pytest.mark.slow
def test_torchrun_restarts_after_kill_9_and_resumes_to_the_target(tmp_path):
    result = torchrun(tmp_path, tmp_path / "run", 30, 32, "kill_rank=1", "kill_at=15", extra=["--max-restarts=1"])
    assert result.returncode == 0, result.stderr
    assert "rank 0 done at step 30" in result.stdout and "rank 1 done at step 30" in result.stdout
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # torchrun saw the kill, then restarted the group
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert checkpoint.step_of(latest) == 30 and checkpoint.read_metadata(latest)["final"] is True


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank_naming_it(tmp_path):
    procs = explicit(tmp_path, tmp_path / "run", 40, "raise_rank=1", "raise_at=5")
    started = time.monotonic()
    outputs = [p.communicate(timeout=90) for p in procs]
    assert time.monotonic() - started < 60
    assert all(p.returncode != 0 for p in procs)
    err0, err1 = outputs[0][1], outputs[1][1]
    assert "ValueError: bad batch at step 5" in err1 and "raised on rank 1 of 2" in err1
    assert "rank 0 of 2" in err0 and "another process has probably died" in err0


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_at_the_same_step(tmp_path):
    logdir = tmp_path / "run"
    procs = explicit(tmp_path, logdir, 10_000, "mark_at=5", "slow=0.01", "save_every=100000")
    deadline = time.monotonic() + 60
    while not Path(f"{logdir}.rank1.mark").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=60) for p in procs]
    assert procs[1].returncode == -signal.SIGTERM
    assert procs[0].returncode == 0, outputs[0][1]
    step = int(outputs[0][0].split("done at step ")[1])
    latest = checkpoint.latest_checkpoint(logdir)
    assert checkpoint.step_of(latest) == step and checkpoint.read_metadata(latest)["final"] is False
    # Rank 1 ended by its re-delivered SIGTERM inside train(), so it never got to write its weights file.
    assert Path(f"{logdir}.rank0.safetensors").exists() and not Path(f"{logdir}.rank1.safetensors").exists()


# ---------------------------------------------------------------- asynchronous


def logistic():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 4, generator=g)
    labels = (inputs @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=16)


def test_asynchronous_workers_converge_and_the_global_step_counts_them_all(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    chief_steps = []

    def total_loss(batch):
        chief_steps.append(1)  # a list of this process: the workers' appends stay in their own copies
        time.sleep(0.002)
        losses.sigmoid_cross_entropy(model(batch[0]).squeeze(1), batch[1])
        return losses.get_total_loss()

    op = create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.5))
    loss = train(op, tmp_path, logistic(), number_of_steps=300, sync_optimizer=False, world_size=3,
                 save_summaries_steps=50)
    assert op.step >= 300 and checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == op.step
    assert len(chief_steps) < 250  # the other two workers did a good share of the 300 updates
    assert loss < 0.3
    with torch.no_grad():
        inputs, labels = logistic().dataset.tensors
        accuracy = ((model(inputs).squeeze(1) > 0).float() == labels).float().mean().item()
    assert accuracy > 0.95


def test_startup_delay_steps_holds_the_workers_back(tmp_path):
    import multiprocessing

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    first_worker_step = multiprocessing.get_context("fork").Value("q", -1)
    chief = os.getpid()

    def total_loss(batch):
        if os.getpid() != chief and first_worker_step.value < 0:
            first_worker_step.value = op.step
        losses.sigmoid_cross_entropy(model(batch[0]).squeeze(1), batch[1])
        return losses.get_total_loss()

    op = create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.5))
    train(op, tmp_path, logistic(), number_of_steps=120, sync_optimizer=False, world_size=2, startup_delay_steps=60)
    assert first_worker_step.value >= 60


@pytest.mark.parametrize("kwargs, error, match", [
    ({"startup_delay_steps": 5}, ValueError, "startup_delay_steps.*must be 0"),
    ({"sync_optimizer": "yes"}, TypeError, "sync_optimizer"),
    ({"master": "tcp://127.0.0.1:1"}, ValueError, "needs `rank` and `world_size`"),
    ({"master": "tcp://127.0.0.1:1", "rank": 2, "world_size": 2}, ValueError, r"rank.*\[0, world_size\)"),
    ({"master": "tcp://127.0.0.1:1", "rank": 0, "world_size": 2, "data": iter([1])}, ValueError, "len()"),
    ({"sync_optimizer": False}, ValueError, "world_size"),
    ({"sync_optimizer": False, "world_size": 2, "master": "tcp://h:1"}, ValueError, "master"),
    ({"is_chief": "yes"}, TypeError, "is_chief"),
    ({"sharding": "fsdp"}, ValueError, r"`sharding`='fsdp' shards the model over several processes.*world_size=1"),
    ({"sharding": "zero3", "master": "tcp://127.0.0.1:1", "rank": 0, "world_size": 2}, ValueError,
     "`sharding` must be None .* or 'fsdp'.*got 'zero3'"),
    ({"sharding": True}, TypeError, "`sharding` must be None or 'fsdp', got True"),
    ({"sharding": "fsdp", "sync_optimizer": False, "world_size": 2}, ValueError, "synchronous"),
    ("validation", ValueError, "`validation` evaluates on the chief alone.*sharding`='fsdp'"),
])
def test_distributed_arguments_are_checked_before_anything_starts(tmp_path, kwargs, error, match):
    if kwargs == "validation":
        from torchslim.validation import Validation

        kwargs = {"sharding": "fsdp", "master": "tcp://127.0.0.1:1", "rank": 0, "world_size": 2,
                  "validation": Validation([(torch.zeros(2, 4), torch.zeros(2))], {"loss": lambda out, b: out.sum()},
                                           every_n_steps=5)}
    model = torch.nn.Linear(4, 1)
    op = create_train_op(lambda b: model(b[0]).mean(), torch.optim.SGD(model.parameters(), lr=0.1))
    kwargs = {"data": logistic(), **kwargs}
    with pytest.raises(error, match=match):
        train(op, tmp_path / "run", number_of_steps=5, **kwargs)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the averager, in one process


@pytest.fixture
def group_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_buckets_are_reduced_while_the_backward_pass_runs_and_in_one_order(group_of_one, monkeypatch):
    import torch.distributed as dist

    from torchslim.distributed import GradientAverager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 2))
    unused = torch.nn.Parameter(torch.ones(3))
    params = [unused, *model.parameters()]  # last to be reduced: it never gets a gradient
    events = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: events.append(("reduce", t.numel()))
                        or real_all_reduce(t, **kw))
    model[0].weight.register_post_accumulate_grad_hook(lambda p: events.append(("first layer done", 0)))
    averager = GradientAverager(params, world_size=1, bucket_mb=64 * 64 * 4 / 2**20)  # about one layer a bucket
    x = torch.randn(16, 8)
    model(x).square().mean().backward()
    reduced_during_backward = events.index(("first layer done", 0))
    assert [e for e in events[:reduced_during_backward] if e[0] == "reduce"], events  # overlap: some went early
    expected = {id(p): p.grad.clone() for p in model.parameters()}
    averager.synchronize()
    assert all(torch.equal(p.grad, expected[id(p)]) for p in model.parameters())
    assert torch.equal(unused.grad, torch.zeros(3))  # no gradient: zeros, as DDP counts it
    # Inner micro-batches communicate nothing; the hooks leave with close().
    events.clear()
    with averager.no_sync():
        model(x).sum().backward()
    assert not [e for e in events if e[0] == "reduce"]
    averager.close()
    model(x).sum().backward()
    assert not [e for e in events if e[0] == "reduce"]


def test_ddp_runs_through_the_user_s_own_model_and_inner_micro_batches_communicate_nothing(group_of_one):
    import gc
    import weakref

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from torchslim.distributed import DDPGradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    names = list(model.state_dict())
    frozen = model[2].bias  # requires a gradient but is not trained: left out of the reduction
    op = create_train_op(lambda b: model(b).square().mean(), torch.optim.SGD(model.parameters(), lr=0.1),
                         variables_to_train=[p for p in model.parameters() if p is not frozen])
    op.accumulate_steps = 2
    sync = DDPGradients(op.modules, op.trained_parameters)
    x = torch.randn(4, 8)
    with op.synchronized(sync):  # the first update: averaged after its backward pass, it tells how to make DDP
        op.run(x)
        op.run(x)
    assert sync.ddp is not None and sync.ddp.find_unused_parameters is False
    reduced = []

    def counting(state, bucket):
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(dist.group.WORLD, bucket)

    sync.ddp.register_comm_hook(None, counting)
    with op.synchronized(sync):
        op.run(x)  # the inner micro-batch: forward and backward under no_sync
        assert reduced == []
        op.run(x)  # the last: one reduction of the trained parameters, during the backward pass
    assert sum(reduced) == sum(p.numel() for p in model.parameters()) - frozen.numel()
    assert op.step == 2 and isinstance(model, torch.nn.Sequential) and list(model.state_dict()) == names
    assert list(op.state_dict()["model"]) == names  # no "module." prefix
    ddp = weakref.ref(sync.ddp)
    sync.close()
    gc.collect()
    assert ddp() is None and not hasattr(frozen, "_ddp_ignored")
    reduced.clear()
    model(x).sum().backward()  # the user's model is plain again
    assert reduced == []
