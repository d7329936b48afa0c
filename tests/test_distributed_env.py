"""Detection of torchrun / SLURM / local environments, SLURM node lists and ports, and the one-process collectives."""

import pytest

from franca.distributed import (
    all_reduce_mean,
    any_rank,
    detect_environment,
    expand_nodelist,
    get_rank,
    get_world_size,
    init_distributed,
    port_from_job_id,
)
from franca.distributed import environment as environment_module

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29400",
}
SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu3",
    "SLURM_JOB_NUM_NODES": "4",
}


def test_torchrun_variables_are_read():
    env = detect_environment(TORCHRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("torchrun", 3, 8, 1, 2)
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 29400)
    assert env.is_distributed and not env.is_main_process


def test_torchrun_wins_over_slurm_when_both_are_set():
    assert detect_environment({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_slurm_master_is_the_first_node_and_the_port_comes_from_the_job_id(monkeypatch):
    monkeypatch.setattr(environment_module.shutil, "which", lambda name: None)  # no scontrol: our parser
    env = detect_environment(SLURM)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 2)
    assert env.master_addr == "gpu07"
    assert env.master_port == 20000 + 123456 % 40000
    assert detect_environment({**SLURM, "MASTER_PORT": "18530"}).master_port == 18530


def test_scontrol_is_preferred_when_present(monkeypatch):
    class Result:
        returncode, stdout = 0, "nodeA\nnodeB\n"

    monkeypatch.setattr(environment_module.shutil, "which", lambda name: "/usr/bin/scontrol")
    calls = []
    monkeypatch.setattr(environment_module.subprocess, "run", lambda args, **kw: calls.append(args) or Result())
    assert detect_environment(SLURM).master_addr == "nodeA"
    assert calls == [["/usr/bin/scontrol", "show", "hostnames", "gpu[07-08,11],cpu3"]]


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a1,b[9-11]", ["a1", "b9", "b10", "b11"]),
        ("r[1-2]n[3-4]", ["r1n3", "r1n4", "r2n3", "r2n4"]),
        ("single", ["single"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node[5-2]", "node[a-b]"])
def test_bad_nodelists_are_refused_with_the_item(bad):
    with pytest.raises(ValueError, match="node"):
        expand_nodelist(bad)


def test_job_id_ports_are_in_range_and_agree():
    ports = {port_from_job_id(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 60000 for p in ports)
    assert port_from_job_id("777_3") == port_from_job_id("7773")  # array job ids: digits only


def test_local_process_and_half_set_torchrun_variables():
    env = detect_environment({})
    assert (env.launcher, env.rank, env.world_size) == ("local", 0, 1)
    assert detect_environment({"WORLD_SIZE": "1"}).launcher == "local"
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect_environment({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match="RANK"):
        detect_environment({**TORCHRUN, "RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent"):
        detect_environment({**TORCHRUN, "RANK": "8"})


def test_one_process_needs_no_process_group(monkeypatch):
    for key in list(TORCHRUN) + list(SLURM):
        monkeypatch.delenv(key, raising=False)
    env, device = init_distributed()
    assert env.launcher == "local" and get_rank() == 0 and get_world_size() == 1
    assert device.type in ("cpu", "cuda")
    assert all_reduce_mean({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}
    assert any_rank(True) and not any_rank(False)
