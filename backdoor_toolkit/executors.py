"""Executors run a planned grid: here in this process (default) or as Ray tasks.

Both run the same two kinds of work from benchmark.py: `prepare_victim` (one backdoored model)
and `run_cell` (one cell on it). Ray runs each backdoored model as a task whose result (plain
tensors) is passed by reference to the task of every cell that shares it, so a model is trained
once however many defenses use it; finished cells come back to the driver as they complete and
go into the same store as a local run's.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

from .cells import CellPlan, VictimPlan, failed_cell, prepare_victim, run_cell
from .config import BenchmarkConfig
from .errors import BdtkError, UnknownNameError
from .results import CellResult


class Reporter(Protocol):
    def started(self, text: str) -> None: ...

    def finished(self, row: CellResult) -> None: ...


class Executor(Protocol):
    def run(self, config: BenchmarkConfig, plans: list[VictimPlan], reporter: Reporter) -> None: ...


class LocalExecutor:
    """One cell after another in this process; the backdoored model is kept for all its cells."""

    def run(self, config: BenchmarkConfig, plans: list[VictimPlan], reporter: Reporter) -> None:
        for plan in plans:
            reporter.started(f"backdoored model: {plan.label}")
            try:
                state = prepare_victim(config, plan)
            except (Exception, SystemExit) as exc:  # a broken attack fails its cells, not the grid
                for cell in plan.cells:
                    reporter.finished(failed_cell(config, plan, cell, exc))
                continue
            for cell in plan.cells:
                reporter.started(f"{cell.defense_label} vs {plan.label}")
                reporter.finished(run_cell(config, plan, cell, state))


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast with a clear message when a Ray address does not answer (ray.init would hang)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BdtkError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT, or 'auto').")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BdtkError(
            f"Cannot reach the Ray cluster at {address} ({exc}). Start one with `ray start --head`, "
            "check the address, or leave out --ray-address to use a local Ray instance."
        ) from None


class RayExecutor:
    """Cells as Ray tasks on a local Ray instance (started here) or an existing cluster."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if address:
            check_reachable(address)
        self.address, self.num_cpus = address, num_cpus

    def _init(self, threads: int) -> tuple[Any, bool]:
        """Ray, and whether this call connected it (then `run` disconnects at the end)."""
        try:
            import ray
        except ImportError:
            raise BdtkError("--executor ray needs Ray: pip install 'backdoor-toolkit[ray]'.") from None
        if ray.is_initialized():  # the caller set Ray up (e.g. with its own resources)
            return ray, False
        env = {"OMP_NUM_THREADS": str(threads), "BDTK_QUIET": "1"}
        try:
            if self.address:
                ray.init(address=self.address, runtime_env={"env_vars": env}, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.num_cpus or os.cpu_count(),
                    include_dashboard=False,
                    runtime_env={"env_vars": env},
                    log_to_driver=False,
                )
        except BdtkError:
            raise
        except Exception as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise BdtkError(f"Cannot start or join {where}: {exc}") from None
        return ray, True

    def run(self, config: BenchmarkConfig, plans: list[VictimPlan], reporter: Reporter) -> None:
        ray, connected_here = self._init(config.threads)
        try:
            cpus = max(
                (node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")),
                default=0,
            )
            if cpus < config.threads:
                raise BdtkError(
                    f"Each cell runs with {config.threads} threads (--threads) and reserves that many CPUs, "
                    f"but no Ray node has more than {cpus:g}; lower --threads or add CPUs to the cluster."
                )
            self._run(ray, config, plans, reporter)
        finally:
            if connected_here:
                ray.shutdown()

    def _run(self, ray: Any, config: BenchmarkConfig, plans: list[VictimPlan], reporter: Reporter) -> None:
        # a task reserves as many CPUs as the threads it runs with (set by prepare_victim/run_cell),
        # so a cell computes the same numbers here as in a local run
        prepare = ray.remote(num_cpus=config.threads)(prepare_victim)
        evaluate = ray.remote(num_cpus=config.threads)(run_cell)
        pending: dict[Any, tuple[VictimPlan, CellPlan]] = {}
        for plan in plans:
            state = prepare.remote(config, plan)
            for cell in plan.cells:
                pending[evaluate.remote(config, plan, cell, state)] = (plan, cell)
        reporter.started(f"{len(pending)} cells on Ray ({len(plans)} backdoored models)")
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    plan, cell = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as exc:  # the backdoored model's task failed, or a worker died
                        row = failed_cell(config, plan, cell, _cause(exc))
                    reporter.finished(row)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def _cause(exc: BaseException) -> BaseException:
    """The original error inside a RayTaskError, so a failed cell names what really went wrong."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


EXECUTORS = ("local", "ray")


def get_executor(name: str, ray_address: str | None = None, num_cpus: int | None = None) -> Executor:
    """The executor called `name`; an unknown name lists the valid ones."""
    if name == "local":
        if ray_address:
            raise BdtkError("--ray-address only applies to --executor ray.")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address, num_cpus)
    raise UnknownNameError("executor", name, list(EXECUTORS))
