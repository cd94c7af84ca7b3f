"""The training loop's host-side agreement between ranks (``all_ranks_have``)."""

from __future__ import annotations

import pytest
import torch


def _agree(rank: int, world: int, init: str, backend: str, out: str) -> None:
    """One gloo rank: the flags of two steps (rank 1 has no batch in the first), the groups used."""
    import torch.distributed as dist

    from finegrain.platform import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        if backend != "gloo":  # as under NCCL: the flags must not go through the default group
            get_backend = dist.get_backend
            dist.get_backend = lambda group=None: backend
        try:
            steps = [train.all_ranks_have(rank == 0), train.all_ranks_have(True)]
        finally:
            if backend != "gloo":
                dist.get_backend = get_backend
        group = train.control_group()
        separate = group is not None and dist.get_backend(group) == "gloo"
        torch.save({"steps": steps, "separate": separate}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_every_rank_stops_when_one_has_no_batch_and_the_flag_never_touches_the_device(
    tmp_path, backend
):
    """Ranks take the same number of steps: a rank without a batch stops every rank. The flag
    is agreed on the host: over the default group when it is gloo, else over a gloo group of
    the same ranks (a flag on a GPU would make the host wait for the device every step)."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_agree, args=(2, init, backend, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert seen["steps"] == [False, True]
        assert seen["separate"] is (backend != "gloo")


def test_one_process_needs_no_agreement():
    from finegrain.platform.train import all_ranks_have

    assert all_ranks_have(True) is True and all_ranks_have(False) is False
