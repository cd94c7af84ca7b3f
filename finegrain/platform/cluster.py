"""The Ray cluster a command runs on: connect to it (or start one), size the work to it, and
check that everything a run reserved is given back.

:func:`connect` — an explicit ``--address``, else ``RAY_ADDRESS`` (``ray job submit`` sets it),
else a *fresh* local Ray (``address="local"``): a stale ``ray_current_cluster`` pointer left by
a head that died without ``ray stop`` does not matter. The local Ray has the machine's real CPU
count, since runs are sized against it, and its dashboard on 127.0.0.1: Ray Train's
``PlacementGroupCleaner`` asks the State API (served by the dashboard) whether a run's
controller is alive, and removes the run's placement group when it is not. Without it, the
placement group of every trial that Tune stops (time budget, ASHA, an error) stays reserved and
the next runs wait forever for its CPUs.

:func:`run_resources` — the Ray resources one run holds while it trains: its training workers,
each worker's decode actors and read task, and the Tune trial that drives it.
:func:`plan_concurrency` — how many such runs the cluster holds at once (its current size, or the
largest size its autoscaler may reach), printed; a run that cannot fit fails before anything
starts. :func:`wait_released` — after a sweep or suite, the cluster's resources are all free
again, or the command says what still holds them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from finegrain.platform.config import ExperimentConfig
from finegrain.platform.paths import script_name  # not tracking: Ray starts without MLflow

TRIAL_CPUS = 0.25  # a Tune trial's actor only waits for its TorchTrainer

# Ray Data's job-wide AutoscalingCoordinator shares the cluster between the job's executions:
# each execution re-sends its request every 10 s and cancels it when it shuts down. A trial
# that Tune stops (ASHA, the time budget) is killed, its executions cannot cancel, and their
# requests hold their share until they expire — 180 s by default. Meanwhile the next trial's
# execution is given only what it asked for, less than the CPUs Ray Train excludes for its
# workers: its read operator is starved ("Cluster resources are not enough to run any task
# from …[MapBatches(read_planned)]. The job may hang forever", seen in `make demo` a minute into
# the trial after an ASHA stop). 30 s (three of the live executions' refresh intervals) frees a
# killed trial's share before that warning's 60 s, without letting a live request lapse.
DATA_REQUEST_EXPIRY = {"RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "30"}


class ClusterTooSmall(ValueError):
    """One run needs more than the whole cluster offers."""


def connect(
    address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True
) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a fresh local Ray with
    ``num_cpus`` CPUs (default: the machine's)."""
    import ray

    from finegrain.platform.logs import quiet_ray_logs

    quiet_ray_logs()
    if not ray.is_initialized():
        _init(address, num_cpus, log_to_driver)
    start_data_actors()


def _init(address: str | None, num_cpus: int | None, log_to_driver: bool) -> None:
    import ray

    hook = "finegrain.platform.logs.setup_worker"  # run in every worker this job starts
    # the script of this job, for the MLflow runs its trials open (their process is Ray's)
    source = script_name(sys.argv[0] if sys.argv else "")
    env_vars = {"FINEGRAIN_SOURCE": source}
    for key, value in DATA_REQUEST_EXPIRY.items():  # a user's own setting wins
        env_vars[key] = os.environ.setdefault(key, value)
    if os.environ.get("FINEGRAIN_METHODS"):  # methods registered at run time (models.register)
        env_vars["FINEGRAIN_METHODS"] = os.environ["FINEGRAIN_METHODS"]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # (Ray merges this with the runtime env `ray job submit` gave the job)
        ray.init(
            address=address,
            runtime_env={"worker_process_setup_hook": hook, "env_vars": env_vars},
            log_to_driver=log_to_driver,
            logging_level="warning",
        )
        return
    # One node: the raylet this starts, so every worker of it, inherits this process's
    # environment. The same variables and hook reach every worker through it, with no job
    # runtime env: with one (any, even env_vars only), Ray starts each worker as setup_worker.py,
    # which execs default_worker.py, two Python start-ups and two imports of Ray per process
    # (measured, idle: an actor took 2.2 s to start with a runtime env, 1.2-1.3 s without; a run
    # starts ~15 processes, a sweep ~15 per trial). default_worker.py runs the hook named by
    # Ray's WORKER_PROCESS_SETUP_HOOK_ENV_VAR, the variable a runtime env's hook is passed in.
    # This process keeps its own environment (a later connect must not follow this cluster);
    # it remembers the cluster's address instead (see ONE_NODE_ENV).
    inherited = {**env_vars, ONE_NODE_ENV: "1", _hook_variable(): hook}
    saved = {key: os.environ.get(key) for key in inherited}
    os.environ.update(inherited)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=True,  # the State API: Ray Train's placement-group cleaner needs it
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
            logging_level="warning",
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    mark_one_node(ray.get_runtime_context().gcs_address)


# A Ray that :func:`connect` started on this machine (``address="local"``) has one node,
# whose processes all reach a local store directly: it needs no relay (whose start — a process
# importing MLflow — held up each new driver by 2-4 s). Its raylet, so every worker of it, is
# started with ONE_NODE_ENV set; the driver remembers that cluster's GCS address (and not the
# variable, which would outlive that cluster in a process that later joins a real one).
ONE_NODE_ENV = "FINEGRAIN_ONE_NODE_RAY"
_ONE_NODE_GCS: list[str] = []


def mark_one_node(gcs_address: str) -> None:
    """Called by the process that just started a local Ray: its cluster has one node."""
    _ONE_NODE_GCS[:] = [gcs_address]


def on_one_node_ray() -> bool:
    """Whether this process is on a one-node Ray that a ``connect`` of this machine started
    (its processes reach a local MLflow store directly: ``tracking.start_relay``)."""
    import ray

    if os.environ.get(ONE_NODE_ENV) == "1":  # a worker of a local Ray
        return True
    return bool(_ONE_NODE_GCS) and ray.get_runtime_context().gcs_address == _ONE_NODE_GCS[0]


def _hook_variable() -> str:
    """The environment variable by which a Ray worker process finds its setup hook (Ray's
    private name for it; Ray is pinned, and tests/test_cluster.py checks the hook runs)."""
    from ray._private import ray_constants

    return ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def start_data_actors() -> None:
    """Start Ray Data's two per-cluster actors (its stats actor and its actor-location tracker)
    from this driver, outside any placement group, unless they run already.

    Ray Data starts them on first use, detached and named, from the process that uses it first:
    in a run, a process of the run's Ray Train worker group, whose placement group they join
    and die with. Every trial of a sweep, every run of a suite or of a test module then started
    both again: two more processes per run, on the path to its first batch (measured: new PIDs
    at every trial of the demo; tiny runs on a warm cluster took 31.1 s with them, 27.9 s
    without, 2 cores, idle). Started here, every
    run finds them (``get_if_exists``); :func:`wait_released` counts them with the job's
    long-lived actors. These are Ray Data's own private helpers (Ray is pinned): if they move,
    Ray Data starts them itself, as before.
    """
    try:
        from ray.data._internal.execution.node_trackers.actor_location import (
            get_or_create_actor_location_tracker,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()
    get_or_create_actor_location_tracker()


@dataclass(frozen=True)
class RunResources:
    """The Ray resources of one run while it trains."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    decode_actors: int  # per worker
    decode_cpus: float
    read_cpus: float
    trial_cpus: float
    threads_per_worker: int = 1  # torch intra-op threads of each worker

    @property
    def data_cpus(self) -> float:
        """Per worker: its decode actors and one read task."""
        return self.decode_actors * self.decode_cpus + self.read_cpus

    @property
    def cpus(self) -> float:
        return self.trial_cpus + self.workers * (self.cpus_per_worker + self.data_cpus)

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def describe(self) -> str:
        w, a = self.workers, self.workers * self.decode_actors
        parts = [
            f"{_n(w, 'worker')} ({_g(self.cpus_per_worker)} CPU"
            + (f", {_g(self.gpus_per_worker)} GPU" if self.gpus_per_worker else "")
            + (f", {self.threads_per_worker} threads" if self.threads_per_worker > 1 else "")
            + " each)",
            f"{_n(a, 'decode actor')} ({_g(self.decode_cpus)} CPU each)",
            f"{_n(w, 'read task')} ({_g(self.read_cpus)} CPU each)",
        ]
        if self.trial_cpus:
            parts.append(f"the trial ({_g(self.trial_cpus)} CPU)")
        gpus = f", {_g(self.gpus)} GPUs" if self.gpus else ""
        return f"{_g(self.cpus)} CPUs{gpus}: " + " + ".join(parts)


def _g(x: float) -> str:
    return f"{x:g}"


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def run_resources(cfg: ExperimentConfig, *, in_trial: bool) -> RunResources:
    """What one run of ``cfg`` holds; ``in_trial``: driven by a Tune trial actor."""
    return RunResources(
        workers=cfg.scaling.workers,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        gpus_per_worker=cfg.scaling.gpus_per_worker,
        decode_actors=cfg.data.decode_actors,
        decode_cpus=cfg.data.decode_cpus,
        read_cpus=cfg.data.read_cpus,
        trial_cpus=TRIAL_CPUS if in_trial else 0.0,
        threads_per_worker=cfg.scaling.threads_per_worker,
    )


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float
    autoscaling: bool  # the sizes are the most the autoscaler may reach
    node_cpus: float  # the largest node's (for one training worker)
    node_gpus: float

    def describe(self) -> str:
        size = f"{_g(self.cpus)} CPUs" + (f", {_g(self.gpus)} GPUs" if self.gpus else "")
        return f"autoscaling cluster of up to {size}" if self.autoscaling else size


def capacity() -> Capacity:
    """The cluster's size now, or the most its autoscaler may reach (Ray Train's own source)."""
    import ray
    from ray._private.state import state  # what Ray Train checks its worker groups against

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    node_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # no autoscaler (a local Ray, a fixed `ray start` cluster)
        most = None
    if most and (
        most.get("CPU", 0) > total.get("CPU", 0) or most.get("GPU", 0) > total.get("GPU", 0)
    ):
        return Capacity(
            cpus=max(float(most.get("CPU", 0)), total.get("CPU", 0.0)),
            gpus=max(float(most.get("GPU", 0)), total.get("GPU", 0.0)),
            autoscaling=True,
            node_cpus=math.inf,  # node types are the autoscaler's to choose
            node_gpus=math.inf,
        )
    return Capacity(total.get("CPU", 0.0), total.get("GPU", 0.0), False, node_cpus, node_gpus)


def plan_concurrency(
    need: RunResources, requested: int, *, what: str = "trial", say: bool = True
) -> int:
    """At most ``requested`` runs at once, as many as the cluster holds, at least one.

    Raises :class:`ClusterTooSmall` when one run does not fit on the whole cluster (or one
    training worker on its largest node), naming the numbers.
    """
    cap = capacity()
    eps = 1e-9
    problems = []
    if need.cpus > cap.cpus + eps:
        problems.append(f"{_g(need.cpus)} CPUs but the cluster has {_g(cap.cpus)}")
    if need.gpus > cap.gpus + eps:
        problems.append(f"{_g(need.gpus)} GPUs but the cluster has {_g(cap.gpus)}")
    if need.cpus_per_worker > cap.node_cpus + eps or need.gpus_per_worker > cap.node_gpus + eps:
        problems.append(
            f"a training worker needs {_g(need.cpus_per_worker)} CPU / "
            f"{_g(need.gpus_per_worker)} GPU on one node; the largest node has "
            f"{_g(cap.node_cpus)} / {_g(cap.node_gpus)}"
        )
    if problems:
        raise ClusterTooSmall(
            f"one {what} needs {need.describe()}; " + "; ".join(problems) + ". Lower "
            "scaling.workers, scaling.cpus_per_worker, data.decode_actors or data.decode_cpus "
            "(--set ...), or use a larger cluster"
        )
    fits = math.floor((cap.cpus + eps) / need.cpus) if need.cpus > 0 else requested
    if need.gpus > 0:
        fits = min(fits, math.floor((cap.gpus + eps) / need.gpus))
    n = max(1, min(requested, fits))
    if say:
        limited = f" (asked for {requested})" if n < requested else ""
        print(
            f"{cap.describe()}: {_n(n, what)} at a time{limited}, each {need.describe()}",
            flush=True,
        )
    return n


# Ray Train registers each run's workers with the same coordinator (a high-priority request,
# re-sent every 20 s, cancelled when its controller shuts down, else held 180 s — a constant).
# Tune kills the controller of a trial it stops, so on a 2-CPU machine the stopped trial's
# 1 CPU and the next trial's 1 CPU take the whole node and the next trial's reads get nothing
# for three minutes (measured: the request of a killed trial stayed, 180 s to expiry, while the
# next trial's read operator starved > 60 s). The run tags its request's id before its controller
# starts (it sends the request first thing), and the id of the trial actor that starts the
# controller — its owner, whose death ends it; whoever closes the run of a stopped trial
# releases the request (sweeps.close_ended_run), as the placement-group cleaner removes its
# placement group.
#
# Released, not cancelled there and then: Tune calls its callbacks on a stopped trial *before*
# it stops the trial's actor, and the controller lives on until its owner is gone, re-sending
# its request; one cancelled in between came back and was held after the sweep (CI, 2026-12-02:
# 'train-42c0…' still at the coordinator when the sweep had ended).
TRAIN_REQUEST_TAG = "ray_train_request"
TRIAL_ACTOR_TAG = "ray_trial_actor"
_COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # Ray Data's (name, namespace)
_RELEASING: list = []  # the threads of release_train_request, joined by wait_released
_RELEASED: set[str] = set()  # requests released since the last wait_released


def train_request_of(trainer) -> str | None:
    """The id under which ``trainer``'s controller will ask the coordinator for its workers'
    resources (``train-<run id>``, Ray Train V2's naming; the run id is drawn when the trainer
    is built), known before ``fit()`` so that a run stopped as its controller starts — before any
    worker runs — is tagged too; None if Ray Train changed."""
    run_id = getattr(getattr(trainer, "train_run_context", None), "run_id", None)
    return f"train-{run_id}" if run_id else None


def current_actor() -> str | None:
    """The id of the actor this process runs (a Tune trial's), which owns the Ray Train
    controller it starts; None in a driver."""
    import ray

    return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None


def cancel_train_request(request: str) -> None:
    """Give back the coordinator's reservation for ``request`` (a stopped run's, whose killed
    controller could not); a no-op when Ray is not connected or nothing is reserved."""
    import ray

    if not ray.is_initialized():
        return
    try:
        coordinator = ray.get_actor(_COORDINATOR[0], namespace=_COORDINATOR[1])
    except ValueError:  # never created in this cluster: nothing reserved
        return
    ray.get(coordinator.cancel_request.remote(request), timeout=30)


def release_train_request(request: str, owner: str | None, timeout: float = 120.0) -> None:
    """Cancel ``request`` (a stopped run's) once ``owner`` — the trial actor that started its
    controller (:func:`current_actor`) — is gone, and with it the controller that re-sends the
    request; in a thread, as Tune stops that actor only after its callbacks returned.
    :func:`wait_released` waits for it, and cancels every released request once more when no
    actor of the job is left. Without an owner, or the State API to watch it, cancels now."""
    import threading

    def release() -> None:
        deadline = time.monotonic() + timeout
        while owner and time.monotonic() < deadline and actor_gone(owner) is False:
            time.sleep(0.5)
        try:
            cancel_train_request(request)
        except Exception as e:  # it still expires on its own (180 s)
            print(f"warning: could not cancel {request} at Ray's coordinator: {e}", flush=True)

    _RELEASED.add(request)
    thread = threading.Thread(target=release, name=f"release-{request}", daemon=True)
    thread.start()
    _RELEASING.append(thread)


def actor_gone(actor_id: str) -> bool | None:
    """Whether actor ``actor_id`` is dead and its process has exited (on this node; the GCS
    marks an actor DEAD before its process ends), or unknown to this cluster; None when the
    State API does not answer."""
    import ray

    try:
        from ray.util.state import get_actor

        context = ray.get_runtime_context()
        # its own cluster's address (see live_actors)
        actor = get_actor(actor_id, address=context.gcs_address, timeout=10)
    except Exception:  # no dashboard (State API), or it did not answer
        return None
    if actor is None:  # an earlier Ray's (a resumed sweep's trial)
        return True
    if actor.state != "DEAD":
        return False
    return not (actor.node_id == context.get_node_id() and _running(actor.pid))


def _finish_releases(timeout: float) -> None:
    """Wait for :func:`release_train_request`'s threads, then cancel every released request
    again (once no actor of the job is left, nothing can re-send one)."""
    deadline = time.monotonic() + timeout
    while _RELEASING:
        _RELEASING.pop().join(max(0.0, deadline - time.monotonic()))
    while _RELEASED:
        request = _RELEASED.pop()
        try:
            cancel_train_request(request)
        except Exception as e:  # it still expires on its own (180 s)
            print(f"warning: could not cancel {request} at Ray's coordinator: {e}", flush=True)


def watch_preemptions() -> None:
    """Ray Train's preemption watcher (an actor per worker group that polls for node drains)
    only where nodes get drained: on an autoscaling cluster (spot nodes, scale-down). On a fixed
    cluster — a laptop, a `ray start` head — nothing drains a node, so it has nothing to watch;
    off, it also stops logging at every worker-group start that its restart could fail
    (ray#53727). Call it in the process that runs the TorchTrainer: Ray Train passes this
    environment variable on to its controller."""
    on = capacity().autoscaling
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1" if on else "0"


def live_placement_groups() -> dict[str, dict]:
    """This job's placement groups that are not removed (Tune's trials', Ray Train's)."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()  # a placement group id ends with its job's id
    return {
        pg_id: group
        for pg_id, group in placement_group_table().items()
        if pg_id.endswith(job) and group.get("state") != "REMOVED"
    }


# Actors that live as long as the job by design and hold no resources: our MLflow relay, the
# coordinator Ray Data starts once per job for its actor pools' autoscaling, and Ray Data's
# stats actor and actor-location tracker (started by the driver: start_data_actors).
_JOB_LONG_ACTORS = ("_AutoscalingCoordinatorActor", "_StatsActor", "ActorLocationTracker")


def live_actors() -> list[str] | None:
    """This job's actors that are alive or being created, other than those that live as long
    as the job by design; None when the State API does not answer."""
    import ray

    try:
        from ray.util.state import list_actors

        context = ray.get_runtime_context()
        actors = list_actors(
            # its own cluster's address: without one, the State API client finds the cluster
            # by listing the machine's GCS processes and fails ("Found multiple active Ray
            # instances") whenever another Ray runs here (another command, the other test worker)
            address=context.gcs_address,
            filters=[("job_id", "=", context.get_job_id())],
            raise_on_missing_output=False,
        )
    except Exception:  # no dashboard (State API), or it did not answer
        return None
    here = context.get_node_id()
    left = []
    for a in actors:
        long_lived = (a.name or "").startswith("finegrain-mlflow-") or (
            a.class_name in _JOB_LONG_ACTORS
        )
        if long_lived and a.state == "ALIVE":
            continue  # but one still being created (Ray Data starts its coordinator with the
            # first dataset a trial runs, maybe as the sweep is stopped) is waited for too
        if a.state != "DEAD":
            left.append(f"{a.class_name} ({a.state})")
        elif a.node_id == here and _running(a.pid):
            # An actor killed while its constructor ran (a trial stopped as its workers and
            # decode actors start) is DEAD for the GCS before its process has exited; if the
            # local Ray is shut down then, that process finishes the constructor, cannot report
            # it to the gone raylet and logs a fatal "Raylet has most likely crashed"
            # (core_worker.cc) to the console. Wait for the process itself.
            left.append(f"{a.class_name} (DEAD, process {a.pid} still exiting)")
    return left


def _running(pid: int | None) -> bool:
    """Whether process ``pid`` on this machine exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_released(timeout: float = 30.0) -> bool:
    """Wait until this job holds no placement group and runs no actor any more (its runs are
    over, Tune and Ray Train gave their reservations back, no worker is still starting);
    else print what is left and return False.

    Called once a sweep or suite has ended, when no run of the job is left to use a placement
    group. A group still held when no actor of the job is alive any more is an orphan, and is
    removed here: Ray Train (2.60) registers a run's worker-group placement group with its
    cleaner only once the workers have *started*, so a trial stopped while its workers start
    (the time budget ending just then; ~10 s per trial on 2 cores) leaves its group reserved,
    with no controller and no cleaner left to remove it (measured: the demo's one-pass baseline
    then waited forever for the CPU it held).

    The coordinator requests of stopped runs (:func:`release_train_request`) are given back
    too: their releases are waited for, and each is cancelled once more, now that no controller
    of the job is left to re-send it.

    A cleaner does not keep a group from being removed once no other actor of the job lives.
    The controller starts its detached cleaner and then sends it ``start_monitoring``; a
    controller killed before the cleaner's process is up (a trial stopped within seconds of its
    start) takes that call with it, and the cleaner idles, never watching and never exiting
    (measured in CI: a cleaner created 4.5 s after its controller was killed ran no task and
    still held its run's group 30 s after the sweep). A cleaner that does watch exits within
    ~2 s of its controller; removing a group it removes too is harmless. An idle cleaner holds
    no CPU and ends with its Ray (Ray offers no public way to kill an unnamed actor of another
    owner); it is not waited for."""
    deadline = time.monotonic() + timeout
    removed: set[str] = set()
    while True:
        groups, actors = live_placement_groups(), live_actors()
        working = None if actors is None else [a for a in actors if not _is_cleaner(a)]
        if not groups and not working:  # (without the State API: nothing to wait for)
            _finish_releases(max(1.0, deadline - time.monotonic()))
            return True
        # only when the State API says so: a controller may still be using the group
        if working == [] and (orphans := {k: g for k, g in groups.items() if k not in removed}):
            _remove_orphans(orphans)
            removed |= set(orphans)
        if time.monotonic() > deadline:
            left = [_describe(pg_id, g) for pg_id, g in groups.items()] + (actors or [])
            print(
                f"warning: {timeout:.0f} s after the end, this job still holds: " + ", ".join(left),
                flush=True,
            )
            _finish_releases(1.0)
            return False
        time.sleep(0.5)


def _is_cleaner(actor: str) -> bool:
    """Whether a :func:`live_actors` entry is a started Ray Train ``PlacementGroupCleaner`` (one
    still being created is waited for: its process would outlive a Ray shut down meanwhile)."""
    return actor == "PlacementGroupCleaner (ALIVE)"


def _remove_orphans(groups: dict[str, dict]) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, group in groups.items():
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
        print(
            f"note: removed {_describe(pg_id, group)}, left by a trial stopped as it started (no "
            "controller of this job was left to remove it)",
            flush=True,
        )


def _describe(pg_id: str, group: dict) -> str:
    bundles = list(group.get("bundles", {}).values())
    return f"placement group {pg_id[:12]}… {group.get('state')} {bundles}"
