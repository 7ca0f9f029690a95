"""The process of one tensor-parallel rank above 0: load this rank's shard, then run every step rank 0 sends.

It waits for work on its pipe from rank 0, with no timeout, so an idle engine keeps its workers; the
pipe's end-of-file (rank 0 closed the engine, or its process died) ends the worker, so none is orphaned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pagoda.config import EngineConfig
from pagoda.distributed.parallel_state import (
    COLLECTIVE_TIMEOUT,
    destroy_tensor_parallel,
    init_tensor_parallel,
)

STOP = None  # what rank 0 sends to end the worker loop
# what a worker sends rank 0: (kind, detail)
JOINING = "joining"  # about to join the process group: rank 0 may join too
READY = "ready"  # shard loaded and KV pool allocated: steps may come
FAILED = "failed"  # detail: the traceback


def cpu_threads_per_rank(world_size: int) -> int:
    """Ranks on one CPU share its cores; each taking them all would only oversubscribe them."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // world_size)


def worker_main(
    config: EngineConfig, max_model_len: int, rank: int, store_port: int, conn: Connection
) -> None:
    # Ctrl-C reaches the whole process group; the engine process decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(config, max_model_len, rank, store_port, conn)
    except EOFError:
        pass  # rank 0 went away: nobody is left to serve
    except BaseException:
        # rank 0 turns this into the error the engine raises; also log it here, where it happened
        message = traceback.format_exc()
        print(f"pagoda tensor-parallel worker {rank} failed:\n{message}", flush=True)
        with contextlib.suppress(OSError):
            conn.send((FAILED, message))
        os._exit(1)  # skip interpreter teardown: a peer may still hold this rank in a collective
    finally:
        destroy_tensor_parallel()
        conn.close()


def _serve(config: EngineConfig, max_model_len: int, rank: int, store_port: int, conn: Connection) -> None:
    # imported here so that a failing import still reaches rank 0 as a clear error
    from pagoda.engine.model_runner import ModelRunner
    from pagoda.loader import open_checkpoint

    device = config.torch_device
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(config.tensor_parallel_size))
    conn.send((JOINING, None))
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    init_tensor_parallel(store, rank, config.tensor_parallel_size, device)
    runner = ModelRunner(config, open_checkpoint(config.model, config.load_format), max_model_len)
    conn.send((READY, None))
    while (inputs := conn.recv()) is not STOP:
        runner.run(inputs)
