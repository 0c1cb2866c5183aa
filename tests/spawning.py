"Waiting for spawned gloo ranks, shared by the DDP and FSDP2 tests (kept apart from helpers.py, which imports the registry that every spawned rank would then import too)."
import time
import pytest

def join_or_fail(ctx, timeout:float, what:str):
    "Wait for the processes of `ctx` (from `torch.multiprocessing.start_processes`); past `timeout` seconds, end them and fail naming `what`"
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive(): p.terminate()
            pytest.fail(f"{what} did not finish within {timeout} s")
