"""Rendezvous ports cannot be taken between choosing and binding them. A clean-clone `make test` lost the
training-only GPU smoke to EADDRINUSE: the port chosen by free_port was taken by the other pytest worker's processes
during the job's ~15 s of imports. Now spawned ranks rendezvous on a port the parent keeps reserved, and a 1-rank job
binds MASTER_PORT 0 (a port the OS picks, at once)."""

import errno
import os
import socket

import pytest
import torch.distributed as dist

from megatron_a3po import parallel


def test_a_reserved_port_keeps_other_binds_off_and_lets_the_store_bind_it():
    with parallel.reserved_port() as port:
        with socket.socket() as other, pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", port))  # what a plain free_port port had no protection against
        assert refused.value.errno == errno.EADDRINUSE
        store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # rank 0's, as in init
        client = dist.TCPStore("127.0.0.1", port, is_master=False)
        store.set("key", "value")
        assert client.get("key") == b"value"
        del client, store
    with socket.socket() as again:  # released when the block ends
        again.bind(("127.0.0.1", port))


def test_one_rank_jobs_bind_port_zero(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    try:
        parallel.init_distributed()
        assert os.environ["MASTER_PORT"] == "0" and dist.get_world_size() == 1
    finally:
        parallel.destroy()
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            os.environ.pop(name, None)


def test_spawned_ranks_rendezvous_on_the_reserved_port():
    from megatron_a3po.spawn import run_in_ranks

    assert run_in_ranks(_world, 2) == [(0, 2), (1, 2)]


def _world():
    return dist.get_rank(), dist.get_world_size()
