"Starting and waiting for gloo ranks, shared by the DDP and FSDP2 tests (kept apart from helpers.py, which imports the registry that every rank would then import too)."
import multiprocessing, os, time, traceback
import pytest
import torch
import torch.multiprocessing as mp

# Ranks are forked from one server process per pytest process, which imports these once; a spawned rank imports them
# itself (about 6 s each). Measured on 2 cores: starting 4 ranks took 27 s spawned and 9 s through the server (its own
# start included), and starting 2 more afterwards 11 s against 0.1 s. The server is a fresh interpreter, not a fork of
# pytest, so a rank inherits only these imports.
PRELOAD = ['fastopt', 'fastopt.sharding', 'fastopt.digits', 'torch.distributed.checkpoint', 'torch._dynamo', 'pytest']

def start(fn, args:tuple, nprocs:int):
    "Start `nprocs` ranks running `fn(rank, *args)`, forked from a server that has imported PRELOAD; returns the context to join"
    multiprocessing.set_forkserver_preload(PRELOAD)   # read when the server starts, on the first call
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method='forkserver')

def join_or_fail(ctx, timeout:float, what:str):
    "Wait for the processes of `ctx` (from `start`); past `timeout` seconds, end them and fail naming `what`"
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive(): p.terminate()
            pytest.fail(f"{what} did not finish within {timeout} s")

def save_rank(out, rank:int, compute):
    "In a rank: run `compute()` and save the dict it returns, or the traceback it raised, as this rank's results in folder `out`"
    try: res = compute()
    except BaseException: res = dict(error=traceback.format_exc())
    torch.save(res, os.path.join(out, f'rank{rank}.pt'))

def rank_results(out, world:int) -> list:
    "The results each of `world` ranks saved with `save_rank`, failing the test with the traceback of a rank that raised"
    res = [torch.load(os.path.join(out, f'rank{r}.pt'), weights_only=False) for r in range(world)]
    for r,d in enumerate(res):
        if 'error' in d: pytest.fail(f"rank {r} raised:\n{d['error']}")
    return res
