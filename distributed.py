"""Several processes, one run: what the trainers need of torch.distributed under torchrun, and the random states.

    torchrun --standalone --nproc_per_node 8 sft.py --batch-size 8 --grad-accum 8

A step is the same for any number of processes N: --grad-accum micro-batches of --batch-size in all (RLOO:
--prompts-per-step prompts, each with its K samples), of which each process takes every N-th, so N must
divide the count. Every process draws the same seeded stream of micro-batches and keeps its share; a loss is
normalised by the step's count over all processes (tokens, pairs, sequences) divided by N, because
DistributedDataParallel averages the processes' gradients, once per step (no_sync before the last
micro-batch). Each process seeds its own RNG (seed + rank); rank 0 alone prints, logs, evaluates and saves.
Without torchrun all of this is a no-op and a script runs as one process, exactly as before.
"""
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from inputs import InputError


_joined = False   # whether start_processes made this process's group


def start_processes():
    """Join torchrun's process group if there is one (gloo on the CPU, nccl and one GPU per process on CUDA);
    processes other than rank 0 print nothing. (rank, world size); (0, 1) without torchrun."""
    global _joined
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _joined = True
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    return rank_and_world()


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def my_share(items, count, flag):
    """This process's items of a step: every N-th from its rank. N must divide the step's count (named by flag)."""
    rank, world = rank_and_world()
    if count % world:
        raise InputError(f"{flag} {count}: a step's count must divide among the {world} processes")
    return items[rank::world]


class Forward(torch.nn.Module):
    """fn(model, **inputs) as a module's forward: DDP synchronises the gradients of what its module's forward ran,
    so the training forward (sequence_logprobs, the reward head) goes through one."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, **inputs):
        return self.fn(self.model, **inputs)


def training_forward(fn, model):
    """The training forward: Forward(fn, model), inside DistributedDataParallel when there are several processes."""
    forward = Forward(fn, model)
    if not dist.is_initialized():
        return forward
    return DistributedDataParallel(forward, device_ids=[torch.cuda.current_device()] if torch.cuda.is_available()
                                   else None, forward_sync_buffers=False)   # the only buffers (RoPE) are constants


def sync_if(last, forward):
    """Around a micro-batch's forward and backward: gradients are all-reduced on the step's last one only."""
    return forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last else nullcontext()


def all_sum(value):
    """A number or a tensor summed over the processes (itself with one process; a tensor comes back where it was)."""
    if not dist.is_initialized():
        return value
    device = "cuda" if torch.cuda.is_available() else "cpu"   # nccl reduces on the GPU, gloo on the CPU
    summed = value.to(device) if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.to(value.device) if torch.is_tensor(value) else summed.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def end_processes():
    """Leave the process group together: a process that leaves while rank 0 still writes its checkpoint aborts
    at exit ("terminate called without an active exception", seen with gloo). Only a group start_processes joined:
    an in-process vLLM engine makes its own (world size 1), which lives as long as the engine."""
    global _joined
    if _joined and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _joined = False


# ---------------------------------------------------------------------------------------- random states

def seed_everything(seed):
    """Python's, numpy's and torch's RNGs, from seed + rank: each process samples its own numbers."""
    seed += rank_and_world()[0]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states():
    """Every process's RNG states, in rank order (a collective: every process calls it; rank 0 gets the list)."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states):
    """This process's RNG states from all_rng_states() of a checkpoint: resuming needs the run's process count."""
    states = states if isinstance(states, list) else [states]   # a checkpoint from before several processes
    rank, world = rank_and_world()
    if len(states) != world:
        raise InputError(f"--resume: the run had {len(states)} process(es); resume it with as many, not {world}")
    set_rng_state(states[rank])
