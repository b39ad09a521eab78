"""What BaseAgent needs of torch.distributed, for runs launched by torchrun.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every process; without it the run is a single
process and every function here is a no-op.
"""
import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Only this process writes logs, TensorBoard, results.json and checkpoints."""
    return rank() == 0


def init(device: torch.device, timeout_s: float):
    """Join the process group: NCCL between GPUs, gloo on CPU. A collective that waits longer than
    timeout_s (a rank crashed or hangs) fails with an error instead of blocking forever."""
    if not is_distributed() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def shutdown(all_finished: bool = False):
    """Leave the process group. all_finished: every process ended the run the same way (completed,
    stopped early) and has no collective left, so they meet at a barrier first: one that tears its
    connections down while another is still in destroy_process_group can abort that one at exit
    ("terminate called without an active exception", seen once in 40 torchrun resumes here).
    After a failure or an interrupt the others may never come: no barrier then."""
    global _cpu_group
    if dist.is_initialized():
        if all_finished:
            dist.barrier()
        dist.destroy_process_group()
    _cpu_group = None


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over all processes, on the device the backend needs, returned where
    `values` was."""
    if not dist.is_initialized():
        return values
    backend_device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                      else torch.device("cpu"))
    reduced = values.to(backend_device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


_cpu_group = None


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process: a stop request one process received holds for all.
    Over gloo (a side group under NCCL), so asking costs no wait on the GPU's queue."""
    global _cpu_group
    if not dist.is_initialized():
        return flag
    if dist.get_backend() != "gloo" and _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group if dist.get_backend() != "gloo" else None)
    return bool(value.item())


def shard_data_loader(loader, seed: int, rank: int, world_size: int):
    """The same DataLoader with a DistributedSampler: each process iterates its share, reshuffled
    every epoch by sampler.set_epoch (BaseAgent calls it)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers,
                      prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None)


LOADER_ATTRIBUTES = ("train_loader", "valid_loader", "test_loader")


def shard_loaders(data_loader, seed: int, rank: int, world_size: int):
    """Give this process its share of every loader of `data_loader` (an agent's data loader object,
    built as for one process): a TensorBatchLoader or an EpochSampler is told its rank, another
    torch DataLoader gets a DistributedSampler (a loader used for two splits is replaced once)."""
    from utils.batches import EpochSampler
    from utils.data import TensorBatchLoader

    replaced = {}
    for attribute in LOADER_ATTRIBUTES:
        loader = getattr(data_loader, attribute, None)
        if isinstance(loader, TensorBatchLoader):
            loader.shard(rank, world_size)
        elif isinstance(getattr(loader, "sampler", None), EpochSampler):   # a resumable train_loader
            loader.sampler.shard(rank, world_size)
        elif isinstance(loader, torch.utils.data.DataLoader):
            if id(loader) not in replaced:
                replaced[id(loader)] = shard_data_loader(loader, seed, rank, world_size)
            setattr(data_loader, attribute, replaced[id(loader)])


def set_epoch(data_loader, epoch: int):
    """DistributedSampler reshuffles only when told the epoch."""
    for attribute in LOADER_ATTRIBUTES:
        sampler = getattr(getattr(data_loader, attribute, None), "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
