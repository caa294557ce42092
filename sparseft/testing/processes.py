"""Run the multi-process tests: a script that starts a 2-rank gloo DDP fit itself, or several
single-process "nodes" of one run on loopback, each as a launcher on its own machine would.

Every child gets ``OMP_NUM_THREADS=1`` (two ranks on a small CPU machine would otherwise each
take every core) and a failure reports the child's own error output, not just an exit code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_QUIET_THREADS = {"OMP_NUM_THREADS": "1"}


def run_ddp_script(script: str, directory: Path, timeout: float = 600) -> None:
    """Write ``script`` to ``directory`` and run it there with this interpreter.

    The script starts its own ranks (``Trainer(strategy="ddp", devices=2)``; Lightning launches
    rank 1 as a new process, ``PL_DISABLE_FORK`` keeps it from forking).

    Raises:
        AssertionError: the script (any rank) did not exit 0; the message ends with its stderr.
    """
    path = directory / "ddp_script.py"
    path.write_text(script)
    env = {**os.environ, **_QUIET_THREADS, "PL_DISABLE_FORK": "1"}
    result = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_environment(node_rank: int, num_nodes: int, port: int) -> dict[str, str]:
    """What Lightning's ``LightningEnvironment`` reads on node ``node_rank`` of a run with one
    process per node: ``MASTER_ADDR`` / ``MASTER_PORT`` (where rank 0 listens), ``NODE_RANK``,
    and ``LOCAL_RANK`` (its presence means "launched externally": Lightning starts no process
    itself); ``WORLD_SIZE`` as Lightning's own launcher exports it (Lightning computes the world
    size from ``num_nodes`` × ``devices``)."""
    return {**os.environ, **_QUIET_THREADS, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "NODE_RANK": str(node_rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(num_nodes)}


def launch_nodes(command: Sequence[str], num_nodes: int, directory: Path, timeout: float = 600) -> list[int]:
    """Start ``command`` once per simulated node, all on loopback, and wait for every one.

    Each launch's output goes to ``<directory>/node<r>.log`` (files, not pipes, so that one
    chatty process cannot block while the other is being waited for). When one is still running
    ``timeout`` seconds after the start, every launch is killed (a rank alone waits forever for
    its peers) and ``subprocess.TimeoutExpired`` is raised.

    Returns:
        The exit code of each launch, by node rank (negative: killed by that signal).
    """
    port = free_port()
    processes = []
    for node_rank in range(num_nodes):
        with open(directory / f"node{node_rank}.log", "w") as log:
            processes.append(subprocess.Popen(list(command), env=node_environment(node_rank, num_nodes, port),
                                              stdout=log, stderr=subprocess.STDOUT, cwd=directory))
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(deadline - time.monotonic(), 0)) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
