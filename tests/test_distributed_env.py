import pytest

from dide_scale.distributed import detect, first_slurm_host


def test_torchrun_environment():
    env = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.launcher) == \
        (3, 1, 4, "n1", 29500, "torchrun")


def test_half_set_environment_is_rejected():
    with pytest.raises(RuntimeError, match="half-set.*WORLD_SIZE"):
        detect({"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_srun_step_environment():
    env = detect({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
                  "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234", "DIDE_MASTER_ADDR": "gpu07"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.launcher) == (5, 1, 8, "gpu07", "srun")
    assert env.master_port == 10000 + 1234 % 20000
    with pytest.raises(RuntimeError, match="SLURM_NTASKS"):
        detect({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a",
                "SLURM_JOB_ID": "1"})


def test_single_process_and_nodelist_parsing():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert first_slurm_host("node[3-5,9]") in ("node3",)
    assert first_slurm_host("alpha,beta") == "alpha"
