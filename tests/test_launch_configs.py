"""Every shipped launch file parses and is consistent; the CPU-capable ones start 2-process runs; the sbatch script resolves."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, offline_env

ACCELERATE_CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_the_expected_launch_files_are_shipped():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {"cpu", "single_gpu", "ddp", "cpu_ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
            "cpu_deepspeed_zero2", "multi_node"} <= names
    assert {f"zero{z}_{p}" for z in (1, 2, 3) for p in ("bf16", "fp16")} <= {p.stem for p in DS_CONFIGS}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.distributed_type.value == raw["distributed_type"] or str(cfg.distributed_type) == raw["distributed_type"]
    if raw["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file()
        assert "mixed_precision" not in raw  # Accelerate refuses it next to a DeepSpeed JSON


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_leaves_the_recipe_numbers_to_accelerate(path):
    cfg = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert cfg[key] == "auto", key
    stage, precision = path.stem.split("_")
    assert cfg["zero_optimization"]["stage"] == int(stage[-1])
    if precision == "fp32":
        assert "bf16" not in cfg and "fp16" not in cfg
    else:
        assert cfg[precision]["enabled"] is True
    if precision == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.slow
def test_cpu_ddp_config_starts_two_processes(tmp_path, tiny_bert, span_data):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "accelerate_configs/cpu_ddp.yaml", "coco_accel/train.py", "--output_dir", str(out),
                           "--model_name_or_path", tiny_bert, "--train_dir", str(span_data), "--skip_from", "2",
                           "--per_device_train_batch_size", "3", "--max_steps", "1", "--save_steps", "0"],
                          cwd=REPO, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "World size 2" in proc.stderr and "DDP" in proc.stderr


def test_sbatch_script_parses_and_resolves_a_two_node_launch():
    script = REPO / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_JOB_ID="4242", DRY_RUN="1", PATH="/usr/bin:/bin")
    out = subprocess.run(["bash", str(script), "--config", "configs/coco_dr.yaml", "--output_dir", "runs/x"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    for rank, line in enumerate(out):
        assert f"--machine_rank {rank} " in line
        assert "--num_machines 2 --num_processes 16 " in line
        assert "--main_process_ip gpu017 --main_process_port 24242 " in line
        assert line.endswith("coco_accel/train.py --config configs/coco_dr.yaml --output_dir runs/x")


def test_sbatch_starts_from_any_folder_and_checks_the_paths_before_launching(tmp_path):
    """SLURM runs a spooled copy of the script from the submission folder: the repository is found through
    COCO_ACCEL_HOME (or named as missing), the launch lines use its train.py and Python, and the node's
    check of --model_name_or_path, --train_dir and --output_dir names the flag and path that fail."""
    import shutil

    spooled = tmp_path / "spool" / "slurm_script"
    spooled.parent.mkdir()
    shutil.copy(REPO / "slurm" / "train.sbatch", spooled)
    env = dict(os.environ, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="gpu[01-02]",
               SLURM_JOB_ID="7", DRY_RUN="1", PATH="/usr/bin:/bin", SLURM_SUBMIT_DIR=str(tmp_path))
    env.pop("COCO_ACCEL_HOME", None)
    lost = subprocess.run(["bash", str(spooled), "--output_dir", "runs/x"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert lost.returncode != 0 and "set COCO_ACCEL_HOME" in lost.stderr

    env["COCO_ACCEL_HOME"] = str(REPO)
    (tmp_path / "model").mkdir()
    ok = subprocess.run(["bash", str(spooled), "--model_name_or_path", "model", "--train_dir", str(tmp_path),
                         "--output_dir", "runs/x"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert len(lines) == 2 and all(f"{REPO}/coco_accel/train.py --model_name_or_path model" in line for line in lines)
    assert all(line.split(": ", 1)[1].startswith(str(REPO / ".venv" / "bin" / "python") + " -m accelerate")
               for line in lines) or not (REPO / ".venv").exists()

    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o500)
    bad = subprocess.run(["bash", str(spooled), "--model_name_or_path", "missing", "--train_dir", str(tmp_path),
                          "--output_dir", str(blocked / "run")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "--model_name_or_path missing is not a readable folder here" in bad.stderr
    if os.geteuid() != 0:  # root writes anywhere
        assert f"--output_dir {blocked / 'run'} cannot be written here" in bad.stderr
