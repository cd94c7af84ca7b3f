"""The cluster a run lands on: concurrency sized to it, a local Ray that always starts, and
resources that always come back (issue 10)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import subprocess_env

from finegrain.platform import cluster
from finegrain.platform.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _capacity(cpus, gpus=0.0, autoscaling=False, node_cpus=None, node_gpus=None):
    return cluster.Capacity(
        cpus,
        gpus,
        autoscaling,
        node_cpus if node_cpus is not None else cpus,
        node_gpus if node_gpus is not None else gpus,
    )


def test_run_resources_count_workers_decoders_reads_and_the_trial():
    cfg = load_config("tune_synthetic")  # 1 worker x 1 CPU, 1 decode actor x 0.5, read 0.25
    need = cluster.run_resources(cfg, in_trial=True)
    assert need.cpus == pytest.approx(0.25 + 1 + 0.5 + 0.25) and need.gpus == 0
    two = cluster.run_resources(
        load_config("tune_synthetic", ["scaling.workers=2", "scaling.gpus_per_worker=1"]),
        in_trial=False,
    )
    assert two.cpus == pytest.approx(2 * 1.75) and two.gpus == 2
    assert "2 workers (1 CPU, 1 GPU each) + 2 decode actors" in two.describe()
    # more than one torch thread a worker is said (one is not worth a word)
    threads = load_config("synthetic", ["scaling.workers=1", "scaling.threads_per_worker=2"])
    assert (
        "1 worker (1 CPU, 2 threads each) + 1 decode actor"
        in cluster.run_resources(threads, in_trial=False).describe()
    )


def test_concurrency_is_what_the_cluster_holds_at_least_one_and_printed(monkeypatch, capsys):
    need = cluster.run_resources(load_config("tune_synthetic"), in_trial=True)  # 2 CPUs
    monkeypatch.setattr(cluster, "capacity", lambda: _capacity(2.0))
    assert cluster.plan_concurrency(need, 8) == 1
    out = capsys.readouterr().out
    assert out.startswith("2 CPUs: 1 trial at a time (asked for 8), each 2 CPUs: 1 worker")
    monkeypatch.setattr(cluster, "capacity", lambda: _capacity(9.0))
    assert cluster.plan_concurrency(need, 8, say=False) == 4
    assert cluster.plan_concurrency(need, 3, say=False) == 3
    # an autoscaling cluster is sized by the most its autoscaler may add
    monkeypatch.setattr(cluster, "capacity", lambda: _capacity(40.0, 8.0, True, math.inf, math.inf))
    gpu = cluster.run_resources(
        load_config("tune_synthetic", ["scaling.gpus_per_worker=1"]), in_trial=True
    )
    assert cluster.plan_concurrency(gpu, 16) == 8
    assert capsys.readouterr().out.startswith("autoscaling cluster of up to 40 CPUs, 8 GPUs")


def test_a_run_larger_than_the_cluster_fails_before_anything_starts(monkeypatch):
    monkeypatch.setattr(cluster, "capacity", lambda: _capacity(2.0, node_cpus=2.0))
    need = cluster.run_resources(
        load_config("tune_synthetic", ["scaling.workers=2"]), in_trial=True
    )
    with pytest.raises(cluster.ClusterTooSmall, match=r"needs 3.75 CPUs.*has 2\. Lower"):
        cluster.plan_concurrency(need, 1)
    wide = cluster.run_resources(
        load_config("tune_synthetic", ["scaling.cpus_per_worker=3"]), in_trial=False
    )
    monkeypatch.setattr(cluster, "capacity", lambda: _capacity(8.0, node_cpus=2.0))
    with pytest.raises(cluster.ClusterTooSmall, match="largest node has 2 / 0"):
        cluster.plan_concurrency(wide, 1)


@pytest.mark.slow
def test_a_command_starts_its_own_ray_despite_a_stale_cluster_pointer():
    """A head that died without `ray stop` leaves ray_current_cluster behind; `train.py` then
    failed at once ("When connecting to an existing cluster, num_cpus and num_gpus must not be
    provided"). Every command connects through `cluster.connect`: without RAY_ADDRESS it starts
    a fresh local Ray and ignores the pointer. (A whole train.py run here cost a minute of CI;
    what it adds to this connect, the train tests run.)"""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))  # socket paths stay short
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nobody there
    env = subprocess_env()
    env["RAY_TMPDIR"] = str(ray_tmp)
    code = (
        "import ray\n"
        "from finegrain.platform import cluster\n"
        "cluster.connect()\n"
        "print('connected to', ray.get_runtime_context().gcs_address, flush=True)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    address = done.stdout.split("connected to ")[-1].strip()
    assert address and address != "127.0.0.1:1", done.stdout


def test_every_ray_init_in_the_project_names_its_address():
    """A bare ``ray.init()`` follows ``ray_current_cluster`` (written by any ``ray start`` on
    the machine, left behind by a head that died) and then refuses ``num_cpus``: two test
    fixtures and the data demo did, and a stale pointer on the CI machine failed 4 tests. Commands
    go through `cluster.connect`; the rest say ``address=`` (``"local"``: a fresh Ray)."""
    import ast

    bare = []
    for path in sorted([*ROOT.glob("finegrain/**/*.py"), *ROOT.glob("experiments/*.py"),
                        *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "init"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"
                and not node.args
                and not any(k.arg in ("address", None) for k in node.keywords)
            ):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bare, f"ray.init() without address= (follows a stale cluster pointer): {bare}"


def test_a_runs_cleaner_finds_its_own_cluster_while_another_ray_runs():
    """Ray Train's placement-group cleaner asks the State API, with no address, whether its
    run's controller lives. With a second Ray on the machine (another finegrain command, the
    other test worker) that lookup used to fail ("Found multiple active Ray instances"), the
    cleaner's thread died and stopped trials' placement groups leaked. Every worker of a job
    `cluster.connect` starts is pinned to its own cluster, by the setup hook it inherits from
    the raylet's environment, with no job runtime env (which would start each worker twice)."""
    import logging

    import ray
    from ray.train.v2._internal.state.util import is_actor_alive

    ray_tmp = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))  # socket paths stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = str(ray_tmp)
    other = subprocess.Popen(  # the other Ray: up until its stdin closes
        [
            sys.executable,
            "-c",
            "import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False); "
            "print('up', flush=True); sys.stdin.read(); ray.shutdown()",
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "up"
        if ray.is_initialized():
            ray.shutdown()
        cluster.connect(num_cpus=1)

        @ray.remote(num_cpus=0)
        class Controller:
            def ping(self) -> bool:
                return True

        @ray.remote(num_cpus=0)
        def cleaner_sees(actor_id: str) -> bool:  # what the cleaner's monitor loop calls
            return bool(is_actor_alive(actor_id, timeout=10))

        @ray.remote(num_cpus=0)
        def worker_facts() -> dict:
            return {
                "runtime_env": ray.get_runtime_context().runtime_env,
                "pinned": os.environ.get("RAY_ADDRESS"),
                "quiet": logging.getLogger("ray.train").level == logging.WARNING,
                "source": os.environ.get("FINEGRAIN_SOURCE"),
            }

        facts = ray.get(worker_facts.remote())
        assert facts["pinned"] == ray.get_runtime_context().gcs_address, facts
        assert facts["quiet"] and facts["source"] and not facts["runtime_env"], facts
        assert cluster._hook_variable() not in os.environ  # the driver keeps its environment
        controller = Controller.remote()
        ray.get(controller.ping.remote())
        alive = ray.get(cleaner_sees.remote(controller._actor_id.hex()))
        ray.kill(controller)
        gone = ray.get(cleaner_sees.remote(controller._actor_id.hex()))
    finally:
        ray.shutdown()
        other.stdin.close()
        other.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert alive and not gone


def test_a_local_ray_starts_no_mlflow_relay_and_neither_do_its_workers():
    """The relay serves processes on other nodes; a Ray that `connect` starts here has one node,
    so neither its driver nor a trial's process (a worker) starts one — and the driver does not
    carry that into another cluster it joins later (test_tune's two-node test needs one)."""
    import ray

    from finegrain.platform import tracking

    uri = "http://127.0.0.1:1"  # a store on the loopback: what a relay would serve
    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(num_cpus=1)
    try:
        tracking.start_relay(uri)
        ray.get(ray.remote(num_cpus=0)(tracking.start_relay).remote(uri))  # as a trial does
        with pytest.raises(ValueError):
            ray.get_actor(tracking._relay_name(uri))
        assert cluster.ONE_NODE_ENV not in os.environ  # only the raylet and its workers had it
    finally:
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # not connect's: may grow
    try:
        tracking.start_relay(uri)
        assert ray.get_actor(tracking._relay_name(uri)) is not None
    finally:
        tracking._OWNED.pop(uri, None)
        ray.shutdown()


def test_a_killed_executions_data_reservation_is_given_back_within_a_minute():
    """A trial Tune stops is killed: its Ray Data executions cannot cancel their requests at
    the job's AutoscalingCoordinator, whose share of the cluster then starved the next trial's
    reads for up to 180 s. Under `cluster.connect` such a request lapses within a minute."""
    import time

    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(num_cpus=2)
    try:

        @ray.remote(num_cpus=0)
        class Reader:
            def start(self) -> str:
                import ray.data

                def slow(batch):
                    time.sleep(0.2)
                    return batch

                ds = ray.data.range(2000, override_num_blocks=200).map_batches(slow, num_cpus=0.25)
                self.batches = iter(ds.iter_batches(batch_size=1))
                next(self.batches)
                return ds.get_dataset_id()  # the execution's id: its requester is data-<id>

        reader = Reader.remote()
        requester = "data-" + ray.get(reader.start.remote(), timeout=120)
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")

        def reserved() -> dict:
            return ray.get(coordinator.get_reserved_resources.remote(requester), timeout=30)

        deadline = time.monotonic() + 30
        while not reserved():  # the execution sends its first request as it starts
            assert time.monotonic() < deadline, "the execution never asked the coordinator"
            time.sleep(1)
        ray.kill(reader)  # as Tune ends a stopped trial: nothing gets to cancel
        killed = time.monotonic()
        while reserved():
            assert time.monotonic() - killed < 60, "a killed execution still holds its share"
            time.sleep(2)
    finally:
        ray.shutdown()


def test_a_stopped_runs_train_request_is_given_back_once_its_controller_is_gone():
    """Tune closes a stopped trial's run before it stops the trial's actor, and the trial's Ray
    Train controller (which that actor owns) re-sends its coordinator request until it is gone:
    the request is cancelled only once the owner is gone (one cancelled at once came back and
    was held after the sweep), and `wait_released` cancels every released request once more."""
    import ray
    from ray.data._internal.cluster_autoscaler import (
        DefaultAutoscalingCoordinator,
        ResourceRequestPriority,
        get_or_create_autoscaling_coordinator,
    )

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(num_cpus=2)
    try:

        @ray.remote(num_cpus=0)
        class Controller:  # as Ray Train's: a high-priority request, re-sent (here every 0.2 s)
            def run(self, request: str) -> None:
                client = DefaultAutoscalingCoordinator(request)
                while True:
                    client.request_resources(
                        [{"CPU": 1}], expire_after_s=180, priority=ResourceRequestPriority.HIGH
                    )
                    time.sleep(0.2)

        @ray.remote(num_cpus=0)
        class Trial:
            def start(self, request: str) -> str:
                self.controller = Controller.remote()
                self.controller.run.remote(request)
                return cluster.current_actor()

        coordinator = get_or_create_autoscaling_coordinator()

        def held(request: str) -> bool:
            return ray.get(coordinator.__ray_call__.remote(lambda c: request in c._ongoing_reqs))

        watched, unwatched = Trial.remote(), Trial.remote()
        owner = ray.get(watched.start.remote("train-watched"), timeout=120)
        ray.get(unwatched.start.remote("train-unwatched"), timeout=120)
        deadline = time.monotonic() + 60
        while not (held("train-watched") and held("train-unwatched")):
            assert time.monotonic() < deadline, "the controllers never asked the coordinator"
            time.sleep(0.5)

        cluster.release_train_request("train-watched", owner)
        cluster.release_train_request("train-unwatched", None)  # no owner known: cancelled now
        time.sleep(2)
        assert held("train-watched")  # its owner lives: not cancelled yet
        assert held("train-unwatched")  # re-sent by its live controller
        ray.kill(watched)  # as Tune ends a stopped trial's actor; its controller goes with it
        killed = time.monotonic()
        while held("train-watched"):
            assert time.monotonic() - killed < 60, "a gone controller's request is still held"
            time.sleep(0.5)
        assert held("train-unwatched")
        ray.kill(unwatched)
        assert cluster.wait_released(timeout=60)
        assert not held("train-unwatched") and not held("train-watched")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_placement_group_left_with_no_actor_to_remove_it_is_removed_after_the_sweep(capsys):
    """Ray Train registers a run's placement group with its cleaner only once the workers have
    started: a trial stopped while they start leaves the group reserved with no controller and
    no cleaner (the demo's baseline then waited forever for its CPU). After a sweep, a group
    is kept while an actor of the job lives (a controller may still be using it) and removed
    once none does but an idle cleaner."""
    import ray
    from ray.util.placement_group import placement_group

    cluster.connect(num_cpus=2)
    try:
        group = placement_group([{"CPU": 1}])  # as a stopped trial's trainer leaves it
        ray.get(group.ready(), timeout=60)

        @ray.remote(num_cpus=0)
        class Alive:
            def ping(self):
                return True

        alive = Alive.remote()
        ray.get(alive.ping.remote())
        deadline = time.monotonic() + 120  # the State API of a just-started Ray, under load
        while not any("Alive" in a for a in cluster.live_actors() or []):
            assert time.monotonic() < deadline, "the State API never listed the live actor"
            time.sleep(1)
        assert not cluster.wait_released(timeout=3)  # an actor lives: the group is not touched
        assert len(cluster.live_placement_groups()) == 1

        # Ray Train's cleaner of a controller killed before the cleaner started: it idles
        # forever, never removing the group, and is not waited for
        class Idle:
            def ping(self):
                return True

        Idle.__qualname__ = "PlacementGroupCleaner"  # how the State API lists Ray Train's
        idle = ray.remote(num_cpus=0)(Idle).options(lifetime="detached").remote()
        ray.get(idle.ping.remote())
        ray.kill(alive)
        while "PlacementGroupCleaner (ALIVE)" not in (cluster.live_actors() or []):
            assert time.monotonic() < deadline, "the State API never listed the cleaner"
            time.sleep(1)
        assert cluster.wait_released(timeout=60)
        assert cluster.live_placement_groups() == {}
        assert "note: removed placement group" in capsys.readouterr().out
        assert ray.available_resources().get("CPU") == 2.0
    finally:
        ray.shutdown()
