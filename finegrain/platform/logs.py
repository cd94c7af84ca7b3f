"""Ray's log lines that our per-epoch lines would drown in, quieted in every worker process.

``quiet_worker_logs`` is the ``worker_process_setup_hook`` of the local Ray (``train.ensure_ray``).
Ray imports this module in *every* worker process it starts, so it imports nothing but
``logging``: a hook in a module that imports torch would add ~0.5 GB to each of the 20-30
helper processes (queues, coordinators, cleaners) of a sweep.
"""

from __future__ import annotations

import logging


def quiet_worker_logs() -> None:
    """Every worker of a local Ray (no dashboard, so no State API): Train V2's placement-group
    cleaner — a safety net for a controller that dies abruptly — would warn every few seconds
    that it cannot ask the State API about the controller. The controller removes its placement
    group itself when a run ends; only the repeated warning goes. Ray Data's INFO lines (a plan
    and a timing per split per epoch, from every trainer) go too; its warnings stay."""
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
