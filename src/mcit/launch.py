"""``mcit run --num-processes N``: N data-parallel processes on this machine.

What ``torchrun --nproc-per-node N -m mcit run ...`` does, without extra tooling: one child per
rank with the environment torch.distributed reads (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); accelerate then picks gloo on CPU or NCCL on GPUs. For several
machines, DeepSpeed or FSDP use ``accelerate launch --config_file configs/accelerate/... -m mcit run``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(args: list[str], num_processes: int) -> int:
    """Run ``python -m mcit ARGS`` in ``num_processes`` ranks; the first failing rank's exit code."""
    port = free_port()
    children = []
    for rank in range(num_processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_processes),
                   LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        children.append(subprocess.Popen([sys.executable, "-m", "mcit", *args], env=env))
    code = 0
    try:
        while children:
            for child in list(children):
                rc = child.poll()
                if rc is None:
                    continue
                children.remove(child)
                if rc != 0 and code == 0:
                    code = rc
                    for other in children:  # one rank failed: the others would wait for it forever
                        other.terminate()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for child in children:
            child.terminate()
        raise
    return code
