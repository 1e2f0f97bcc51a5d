"""Hostile and damaged checkpoint files: each refused by name and reason, and train/eval/warm start fall back."""

from __future__ import annotations

import json
import logging
import os
import struct
import time

import pytest
import torch
import xxhash
from conftest import Logistic, batches

from torchslim import _statetree, _tensorfile, checkpoint, evaluation, learning, variables
from torchslim.checkpoint import CorruptCheckpointError


def write_state_json(path, meta):
    (path / "state.json").write_text(json.dumps(meta))


def forge_tensor_file(path, data: bytes):
    """Replace the tensor file with ``data``, recording its true size and checksums: only checks of its contents refuse it."""
    (path / "tensors.safetensors").write_bytes(data)
    meta = json.loads((path / "state.json").read_text())
    chunk = meta["files"]["tensors.safetensors"]["chunk_bytes"]
    meta["files"]["tensors.safetensors"].update(
        bytes=len(data), chunks=[xxhash.xxh3_64_hexdigest(data[i:i + chunk]) for i in range(0, max(1, len(data)), chunk)])
    write_state_json(path, meta)


def with_header(path, change):
    """The tensor file with its JSON header changed by ``change(header)``, the data left as it was."""
    data = (path / "tensors.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-(len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def header_change(key, **fields):
    return lambda p: forge_tensor_file(p, with_header(p, set_entry(key, **fields)))


def set_entry(key, **fields):
    def change(header):
        header[key].update(fields)
    return change


def forged_length(n):
    return lambda p: forge_tensor_file(p, struct.pack("<Q", n) + (p / "tensors.safetensors").read_bytes()[8:])


def damage_state(field, value):
    def damage(path):
        meta = json.loads((path / "state.json").read_text())
        meta[field] = value
        write_state_json(path, meta)
    return damage


def deeply_nested(path):
    meta = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")


def nested_past_the_limit(path):
    meta = json.loads((path / "state.json").read_text())
    deep: object = 1
    for _ in range(150):  # parses as JSON; deeper than any state a checkpoint holds
        deep = [deep]
    meta["state"]["extra"] = deep
    write_state_json(path, meta)


def file_outside(path):
    meta = json.loads((path / "state.json").read_text())
    meta["files"] = {"../../elsewhere.safetensors": meta["files"]["tensors.safetensors"]}
    write_state_json(path, meta)


def symlinked(path):
    target = path.parent / "elsewhere.safetensors"
    os.replace(path / "tensors.safetensors", target)
    os.symlink(target, path / "tensors.safetensors")


def unknown_key(path):
    meta = json.loads((path / "state.json").read_text())
    meta["state"]["model"]["weight"] = {"__tensor__": "not/in/the/file"}
    write_state_json(path, meta)


def flipped_byte(path):
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(data))


HOSTILE = {
    "truncated": (lambda p: (p / "tensors.safetensors").write_bytes((p / "tensors.safetensors").read_bytes()[:50]),
                  "tensors.safetensors has 50 bytes, but"),
    "header length 2^60": (forged_length(2**60),
                           "header length of 1152921504606846976 bytes"),
    "offsets out of range": (header_change("model/weight", data_offsets=[0, 10**9]),
                             "outside the"),
    "overlapping offsets": (header_change("model/bias", data_offsets=[0, 4]),
                            "whose bytes overlap"),
    "shape not matching the bytes": (header_change("model/weight", shape=[1000, 1000]),
                                     "which needs 4000000 bytes"),
    "dtype not matching the bytes": (header_change("model/weight", dtype="F64"),
                                     "which needs 32 bytes"),
    "unknown dtype": (header_change("model/weight", dtype="Q99"), "unknown dtype"),
    "header not JSON": (lambda p: forge_tensor_file(p, struct.pack("<Q", 8) + b"{{{{{{{{" + b"\0" * 64),
                        "header that is not valid JSON"),
    "state.json not JSON": (lambda p: (p / "state.json").write_text("{'format': 2"), "state.json is not valid JSON"),
    "state.json nested 10^5 deep": (deeply_nested, "state.json is not valid JSON"),
    "state nested past the limit": (nested_past_the_limit, "nested deeper than 100"),
    "state.json without files": (damage_state("files", None), "lists no tensor files"),
    "state.json of another format": (damage_state("format", "torchslim.checkpoint/99"), "not in a format this release reads"),
    "a file outside the checkpoint": (file_outside, "not a plain file of the checkpoint"),
    "a symlinked tensor file": (symlinked, "is a symbolic link"),
    "a reference to a key not in the file": (unknown_key, "'not/in/the/file' (at model/weight), which no file holds"),
    "a flipped byte": (flipped_byte, "do not match their checksum"),
    "a tensor file missing": (lambda p: os.remove(p / "tensors.safetensors"), "tensors.safetensors is missing"),
}


def run_state(problem: Logistic, step: int) -> dict:
    return {"model": problem.model.state_dict(), "optimizer": problem.optimizer.state_dict(), "global_step": step}


@pytest.mark.parametrize("damage, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_each_hostile_file_is_refused_naming_the_checkpoint_and_the_reason(tmp_path, damage, reason):
    path = tmp_path / "model.ckpt-2"
    checkpoint.save(run_state(Logistic(), 2), path)
    damage(path)
    started = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="checkpoint .*model.ckpt-2 is corrupt") as error:
        checkpoint.load(path)
    assert reason in str(error.value)
    assert time.monotonic() - started < 5  # nothing of the size a forged header claims was read or allocated


@pytest.mark.parametrize("damage, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_train_falls_back_to_the_checkpoint_before_a_hostile_one(tmp_path, caplog, damage, reason):
    logdir = tmp_path / "run"
    first = Logistic()
    learning.train(learning.create_train_op(first.loss, first.optimizer), logdir, data=batches(), number_of_steps=3,
                   save_interval_steps=1, progress_bar=False, saver=checkpoint.Saver(max_to_keep=None))
    damage(logdir / "model.ckpt-3")
    again = Logistic(seed=5)
    caplog.set_level(logging.INFO, logger="torchslim")
    op = learning.create_train_op(again.loss, again.optimizer)
    learning.train(op, logdir, data=batches(), number_of_steps=4, progress_bar=False,
                   saver=checkpoint.Saver(max_to_keep=None))
    assert "model.ckpt-3 is corrupt: " in caplog.text and reason in caplog.text
    assert "Restored " + str(logdir / "model.ckpt-2") in caplog.text and op.step == 4


def test_a_state_that_is_not_a_runs_state_is_passed_over_by_train(tmp_path, caplog):
    logdir = tmp_path / "run"
    first = Logistic()
    learning.train(learning.create_train_op(first.loss, first.optimizer), logdir, data=batches(), number_of_steps=2,
                   save_interval_steps=1, progress_bar=False)
    damage_state("state", {"model": 5, "optimizer": {}, "global_step": 3})(logdir / "model.ckpt-2")
    caplog.set_level(logging.INFO, logger="torchslim")
    again = Logistic()
    op = learning.create_train_op(again.loss, again.optimizer)
    learning.train(op, logdir, data=batches(), number_of_steps=3, progress_bar=False)
    assert "model.ckpt-2 is corrupt: its model is not a dict of tensors" in caplog.text
    assert "Restored " + str(logdir / "model.ckpt-1") in caplog.text


def saved_run(tmp_path):
    """A logdir with checkpoints at steps 1 and 2 of Logistic's weights, the newest truncated."""
    logdir = tmp_path / "run"
    for step in (1, 2):
        problem = Logistic(seed=step)
        checkpoint.Saver(max_to_keep=None).save(run_state(problem, step), logdir, step)
    (logdir / "model.ckpt-2" / "tensors.safetensors").write_bytes(b"\0" * 10)
    return logdir


def test_evaluation_and_warm_start_on_a_logdir_fall_back_past_a_corrupt_newest_one(tmp_path, caplog):
    logdir = saved_run(tmp_path)
    expected = Logistic(seed=1).model.state_dict()
    model = torch.nn.Linear(4, 1)
    results = evaluation.evaluate_once(logdir, None, model, batches(1),
                                       metrics={"w": lambda p, t: torch.as_tensor(float(model.weight.sum()))},
                                       eval_fn=lambda batch: (None, None))
    assert results["w"] == pytest.approx(float(expected["weight"].sum()))
    assert "model.ckpt-2 is corrupt" in caplog.text and "falling back" in caplog.text
    warm = Logistic(seed=9)
    op = learning.create_train_op(warm.loss, warm.optimizer)
    variables.assign_from_checkpoint_fn(logdir)(op)
    assert torch.equal(warm.model.weight, expected["weight"])


def test_a_corrupt_checkpoint_named_explicitly_still_raises(tmp_path):
    logdir = saved_run(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="model.ckpt-2 is corrupt"):
        variables.load_variables(logdir / "model.ckpt-2")
    with pytest.raises(CorruptCheckpointError, match="model.ckpt-2 is corrupt"):
        checkpoint.restore(logdir / "model.ckpt-2")


def test_restore_when_no_checkpoint_reads_back(tmp_path):
    assert checkpoint.restore(tmp_path) is None
    logdir = saved_run(tmp_path)
    (logdir / "model.ckpt-1" / "state.json").write_text("[")
    with pytest.raises(CorruptCheckpointError, match="oldest of the 2 checkpoints .* none of them reads back"):
        checkpoint.restore(logdir)


def test_load_into_live_tensors_copies_straight_into_them_and_only_after_every_check(tmp_path):
    source = Logistic(seed=1)
    checkpoint.save(run_state(source, 1), tmp_path / "model.ckpt-1")
    target = Logistic(seed=2)
    live = run_state(target, 0)
    weight = target.model.weight
    state = checkpoint.load(tmp_path / "model.ckpt-1", into=live)
    assert state["model"]["weight"] is live["model"]["weight"]  # the live tensor itself, now holding the saved values
    assert torch.equal(weight, source.model.weight)
    # A bad checkpoint writes nothing into them.
    before = weight.detach().clone()
    checkpoint.save(run_state(Logistic(seed=3), 2), tmp_path / "model.ckpt-2")
    unknown_key(tmp_path / "model.ckpt-2")
    with pytest.raises(CorruptCheckpointError):
        checkpoint.load(tmp_path / "model.ckpt-2", into=run_state(target, 0))
    assert torch.equal(weight, before)


def test_the_tensor_file_is_a_safetensors_file_checksummed_per_chunk(tmp_path):
    import safetensors.torch

    tensors = {"a": torch.randn(1000), "b": torch.arange(10, dtype=torch.int16), "c": torch.tensor(True),
               "d": torch.randn(3, 3, dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
    entry = _tensorfile.write(str(tmp_path / "t.safetensors"), tensors, chunk_bytes=1024)
    data = (tmp_path / "t.safetensors").read_bytes()
    assert entry["bytes"] == len(data) and len(entry["chunks"]) == -(-len(data) // 1024)
    assert entry["chunks"][1] == xxhash.xxh3_64_hexdigest(data[1024:2048])
    back = safetensors.torch.load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    f = _tensorfile.TensorFile(str(tmp_path / "t.safetensors"), entry)
    f.verify()
    assert all(f.view(k).data_ptr() % f.view(k).element_size() == 0 for k in tensors if tensors[k].numel())


def test_the_cli_on_a_logdir_falls_back_past_a_corrupt_newest_one(tmp_path, capsys, caplog):
    from torchslim import cli

    logdir = saved_run(tmp_path)
    assert cli.main(["inspect", str(logdir)]) == 0
    assert f"checkpoint: {logdir / 'model.ckpt-1'}" in capsys.readouterr().out
    assert cli.main(["export", str(logdir), str(tmp_path / "w.safetensors")]) == 0
    assert "of " + str(logdir / "model.ckpt-1") in capsys.readouterr().out
    assert caplog.text.count("model.ckpt-2 is corrupt: tensors.safetensors has 10 bytes") == 2
    assert cli.main(["inspect", str(logdir / "model.ckpt-2")]) == 2  # named explicitly: refused, not replaced


def test_a_corrupt_chunk_in_the_optimizers_part_is_refused_before_any_live_tensor_is_written(tmp_path, monkeypatch):
    """The model's bytes check out, a later chunk of Adam's state does not: no live tensor, model or optimizer, is touched."""
    import functools

    def adam(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        return model, opt

    model, opt = adam(1)
    monkeypatch.setattr(_tensorfile, "write", functools.partial(_tensorfile.write, chunk_bytes=4096))
    path = checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "model.ckpt-1")
    tensor_file = tmp_path / "model.ckpt-1" / "tensors.safetensors"
    data = bytearray(tensor_file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    model_end = 8 + n + max(e["data_offsets"][1] for k, e in header.items() if k.startswith("model/"))
    begin, end = header["optimizer/state/1/exp_avg_sq"]["data_offsets"]
    corrupt = 8 + n + (begin + end) // 2
    assert corrupt // 4096 > model_end // 4096  # a chunk that holds none of the model's bytes
    data[corrupt] ^= 0xFF
    tensor_file.write_bytes(bytes(data))

    live_model, live_opt = adam(2)
    live = {"model": live_model.state_dict(), "optimizer": live_opt.state_dict()}
    before = {k: t.clone() for k, t in _statetree.tensor_paths(live).items()}
    with pytest.raises(CorruptCheckpointError, match=f"chunk {corrupt // 4096} of .* do not match their checksum"):
        checkpoint.load(path, into=live)
    assert all(torch.equal(t, before[k]) for k, t in _statetree.tensor_paths(live).items())  # nothing written into them


def mapped_deleted_files() -> list[str]:
    """Files this process still maps although they were deleted (their disk space stays in use)."""
    with open("/proc/self/maps") as f:
        return [line.split(None, 5)[-1].strip() for line in f if "tensors.safetensors (deleted)" in line]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_mmap_false_gives_tensors_their_own_memory_and_keeps_no_deleted_file_in_use(tmp_path):
    path = checkpoint.save({"m": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "model.ckpt-1")
    viewed, owned = checkpoint.load(path), checkpoint.load(path, mmap=False)
    owned["m"].add_(1)  # written: the file is not
    assert torch.equal(checkpoint.load(path)["m"], torch.arange(1 << 20, dtype=torch.float32))
    checkpoint._checkpointdir.remove(path)
    assert len(mapped_deleted_files()) == 1  # the view's map: kept alive by `viewed`
    del viewed
    assert mapped_deleted_files() == []
    assert owned["m"][5].item() == 6.0
    with pytest.raises(TypeError, match="`mmap` must be True .* or False .*, got 'no'"):
        checkpoint.load(tmp_path, mmap="no")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_resumed_run_keeps_no_deleted_checkpoint_mapped(tmp_path):
    problem = Logistic()
    op = learning.create_train_op(problem.loss, torch.optim.Adam(problem.model.parameters(), lr=0.01))
    learning.train(op, tmp_path, batches(), number_of_steps=5, save_interval_steps=5)
    problem = Logistic()
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=0.01)
    op = learning.create_train_op(problem.loss, optimizer)
    # Resumes from step 5 (Adam's state not there yet: restored into memory of its own), then retention
    # (max_to_keep=1) deletes model.ckpt-5 while the optimizer's state lives on.
    learning.train(op, tmp_path, batches(), number_of_steps=10, save_interval_steps=5,
                   saver=checkpoint.Saver(max_to_keep=1))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path)] == ["model.ckpt-10"]
    assert optimizer.state and mapped_deleted_files() == []
