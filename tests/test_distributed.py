"""torchrun with 2 gloo processes on CPU, against one process, through main.py."""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import MAIN, run_main_in_process, set_args

TINY = {"agent": "tests.tiny_agent:TinyAgent", "progress_bar": False, "max_epoch": 3}


def torchrun(args, cwd, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(MAIN), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def config(**values) -> str:
    return json.dumps({**TINY, **values})


def weights(cwd, exp):
    return torch.load(cwd / "experiments" / exp / "checkpoints" / "checkpoint.pth.tar",
                      weights_only=True)["models"]["model"]


def results(cwd, exp):
    return json.loads((cwd / "experiments" / exp / "results.json").read_text())


def two_processes_match_one(loader: dict, cwd):
    """experiments/one: one process, batches of 32; experiments/two: torchrun, 2 processes with
    batches of 16 (or accumulated halves of them), 3 epochs: the same run."""
    plain = {key: value for key, value in loader.items() if key != "grad_accumulation"}
    single = run_main_in_process([config(exp_name="one", batch_size=32, **plain)], cwd)
    assert single.returncode == 0, single.stderr
    double = torchrun([config(exp_name="two", batch_size=16 // loader.get("grad_accumulation", 1), **loader)], cwd)
    assert double.returncode == 0, double.stderr
    assert "global batch 32" in double.stdout

    one, two = weights(cwd, "one"), weights(cwd, "two")
    assert one.keys() == two.keys() == {"weight", "bias"}          # no "module." prefix
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name
    first, second = results(cwd, "one"), results(cwd, "two")
    assert first["iterations"] == second["iterations"] == 3 * loader.get("n_samples", 96) // 32   # 32 per step
    # Validation is reduced over both processes: the same numbers as one process over all of it.
    for tag in ("val/loss", "val/accuracy"):
        assert first["last"][tag] == pytest.approx(second["last"][tag], abs=1e-6)
    # Only rank 0 wrote: one event file, one set of logs.
    assert len(list((cwd / "experiments" / "two" / "summaries").iterdir())) == 1


# With torch DataLoaders the order is the data set's (shuffle off): a DistributedSampler's shuffle
# draws from its own generator, so its order cannot equal one process's RandomSampler order.
# Accumulated: 2 processes x 2 accumulated batches of 8 (DDP's all-reduce skipped on the first).
# The tensor loader's case is the straight run of the SIGTERM test below.
@pytest.mark.parametrize("loader", [{"loader": "torch", "shuffle": False, "data_loader_workers": 1},
                                    {"loader": "tensor", "grad_accumulation": 2}],
                         ids=["torch", "tensor-accumulated"])
def test_two_processes_match_one_process_with_twice_the_batch(loader, tmp_path):
    two_processes_match_one(loader, tmp_path)


def test_a_crashing_rank_stops_the_run_with_its_error(tmp_path):
    started = time.monotonic()
    crashed = torchrun([config(exp_name="crash", batch_size=16, max_epoch=50, crash_at_iteration=4,
                               distributed_timeout_s=30)], tmp_path, timeout=240)
    assert crashed.returncode != 0
    assert "simulated crash of rank 1" in crashed.stderr
    assert time.monotonic() - started < 200


def test_a_hanging_rank_times_out_instead_of_blocking_forever(tmp_path):
    started = time.monotonic()
    hung = torchrun([config(exp_name="hang", batch_size=16, max_epoch=50, crash_at_iteration=4,
                            crash_by_hanging=True, distributed_timeout_s=5)], tmp_path, timeout=240)
    assert hung.returncode != 0
    assert "[rank0]" in hung.stderr and "timed out" in hung.stderr.lower()
    assert time.monotonic() - started < 120


def test_data_loaders_get_a_distributed_sampler_reshuffled_every_epoch():
    from utils.data import make_data_loader
    from utils.distributed import set_epoch, shard_data_loader

    dataset = torch.utils.data.TensorDataset(torch.arange(96.0))
    loader = make_data_loader(dataset, 16, shuffle=True, workers=0, pin_memory="auto", device="cpu")
    sharded = shard_data_loader(loader, seed=1, rank=1, world_size=2)
    sampler = sharded.sampler
    assert isinstance(sampler, torch.utils.data.distributed.DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle) == (2, 1, True)
    assert len(sharded) == 3 and sharded.batch_size == 16            # 48 of the 96 samples
    first = torch.cat([batch for (batch,) in sharded])
    set_epoch(SimpleNamespace(train_loader=sharded), 1)
    assert sampler.epoch == 1
    assert not torch.equal(first, torch.cat([batch for (batch,) in sharded]))


def test_shard_loaders_gives_each_rank_its_share_of_every_loader():
    from types import SimpleNamespace

    from utils.data import TensorBatchLoader, make_data_loader
    from utils.distributed import shard_loaders

    dataset = torch.utils.data.TensorDataset(torch.arange(10.0))
    shared = make_data_loader(dataset, 2, shuffle=False, workers=0, pin_memory="auto", device="cpu")
    tensors = TensorBatchLoader(torch.arange(10.0), torch.arange(10), 2)
    data = SimpleNamespace(train_loader=tensors, valid_loader=shared, test_loader=shared)
    shard_loaders(data, seed=0, rank=1, world_size=2)
    assert (tensors.rank, tensors.world_size) == (1, 2)
    assert data.valid_loader is data.test_loader                 # one loader for two splits: replaced once
    assert torch.cat([b for (b,) in data.valid_loader]).tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]


def test_sigterm_stops_every_process_inside_the_epoch_and_the_run_resumes_exactly(tmp_path):
    """A preempted torchrun job: SIGTERM reaches torchrun, which passes it to both processes; they
    agree on the step to stop after, rank 0 saves where the epoch is, and a torchrun --resume
    with as many processes ends where the run that never stopped (itself equal to one process with
    twice the batch) ends. One process cannot take over inside an epoch (its share of the order
    differs): refused in one line, nothing changed; at an epoch's end it can, with the same global
    batch (a batch_size that keeps it may change on resume)."""
    tiny = {"loader": "tensor", "n_samples": 320}                   # 10 steps an epoch of 2 x 16, 3 epochs
    two_processes_match_one(tiny, tmp_path)                         # experiments/two: the straight run
    stopped = torchrun([config(exp_name="split", batch_size=16, sigterm_at_iteration=14, **tiny)], tmp_path)
    assert stopped.returncode != 0
    exp = tmp_path / "experiments" / "split"
    state = torch.load(exp / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] >= 14 and state["position"]["epoch_position"] >= 4
    assert results(tmp_path, "split")["status"] == "interrupted"

    before = {path: path.read_bytes() for path in exp.rglob("*") if path.is_file()}
    alone = run_main_in_process([config(exp_name="split"), "--resume", *set_args(batch_size=32)], tmp_path)
    assert alone.returncode == 2 and "resume it with as many" in alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1
    assert {path: path.read_bytes() for path in exp.rglob("*") if path.is_file()} == before

    resumed = torchrun([config(exp_name="split"), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    for name, value in weights(tmp_path, "two").items():
        assert torch.equal(value, weights(tmp_path, "split")[name]), name
    assert results(tmp_path, "split")["epochs_done"] == 3

    alone = run_main_in_process([config(exp_name="split"), "--resume", *set_args(batch_size=32, max_epoch=4)],
                                tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert results(tmp_path, "split")["epochs_done"] == 4
