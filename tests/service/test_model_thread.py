"""A service does all its torch work on one thread: loading, warm-up and every model call.

torch's CPU kernels run on an OpenMP team owned by the calling thread; a model loaded on one thread and run on
another gave the process two teams, and generation at 19M parameters ran 0.62-0.64 s instead of 0.42 s on 2 cores
(``shared.worker``). This checks the threads themselves, not a timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from shared.server import ServerConfig, build_grpc_server, serve
from shared.worker import ModelWorker, model_thread


@pytest.mark.asyncio
async def test_load_warm_up_and_calls_run_on_the_one_model_thread():
    seen: dict[str, int] = {}

    def load():
        seen["load"] = threading.get_ident()
        return object()

    def warm_up(backend):
        seen["warm_up"] = threading.get_ident()

    def on_ready(server):
        async def call_then_stop():
            seen["call"] = await ModelWorker("test").run(threading.get_ident)
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: it drains and returns

        asyncio.get_running_loop().create_task(call_then_stop())

    server = await build_grpc_server(ServerConfig(port=0, grace_seconds=0), [])
    await asyncio.wait_for(serve(server, load, warm_up, 0, on_ready, role="test"), timeout=30)
    assert set(seen) == {"load", "warm_up", "call"}
    assert len(set(seen.values())) == 1, seen
    assert seen["call"] != threading.get_ident()  # not the event loop's thread
    assert model_thread("test").submit(threading.get_ident).result() == seen["call"]


@pytest.mark.asyncio
async def test_workers_of_one_role_share_its_thread_and_roles_do_not():
    """Two services in one process (as in these tests) keep apart: one may call the other's API from its model
    thread (the reference service's TGI backend calls generation's) without waiting on itself."""
    a, b, other = ModelWorker("role-a"), ModelWorker("role-a"), ModelWorker("role-b")
    ids = await asyncio.gather(*(w.run(threading.get_ident) for w in (a, b, other)))
    assert ids[0] == ids[1] != ids[2]
    a.shutdown()  # leaves the role's thread running: it holds the role's OpenMP team
    assert await b.run(threading.get_ident) == ids[0]


@pytest.mark.parametrize("given", [None, "300000"])
def test_the_command_sets_the_openmp_spin_count_before_torch_loads(given):
    """``rlhf`` sets GOMP_SPINCOUNT (10,000) before anything imports torch, which is when libgomp reads it; an
    operator's own value is kept."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    probe = (
        "import os, sys; import services.cli; "
        "print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT']); "
        "import services.generation.servicer; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", given or "10000", "True"]
