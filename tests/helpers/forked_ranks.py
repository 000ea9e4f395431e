"""Starts a job's processes as `torchrun` or `accelerate launch` would, but forked from this one interpreter
once it has imported the trainer's libraries: each rank skips the ~5 CPU-seconds of imports a fresh
interpreter pays, which is most of what a tiny parity run costs.

    python tests/helpers/forked_ranks.py torchrun [torchrun's options] SCRIPT ARGS...
    python tests/helpers/forked_ranks.py accelerate [accelerate launch's options] SCRIPT ARGS...
    python tests/helpers/forked_ranks.py serve

`serve` pays the imports once for many launches (tests/conftest.py keeps one such server per test
process): it reads one JSON request a line on stdin, {"argv": [launcher, options..., SCRIPT, ARGS...],
"cwd", "env", "stdout", "stderr"} (the last two: files the launch writes its output to), forks a launch
for it, and answers on stdout with {"pid"} at once and {"pid", "returncode"} when it ends.

The options are parsed by torchrun's and accelerate's own parsers, and under `accelerate` its own launch
code prepares the environment (the DeepSpeed or DDP variables from the config file); only the last step,
starting the processes, is replaced. Each rank gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, ...) and runs SCRIPT as __main__, with
coco_accel/train.py run as the module it turns itself into. One node only: multi-node runs and the
launchers themselves are proved by tests that start the real ones. When a rank fails the others are
stopped (SIGTERM, then SIGKILL after a grace period), as torchrun does; the exit code is the first
failing rank's, 0 when all succeed.
"""

import os
import runpy
import signal
import sys
import time
import traceback

GRACE_S = 30
TRAINER = "coco_accel/train.py"


def _preimport(deepspeed: bool) -> None:
    """What every rank imports anyway, imported once before forking."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM  # noqa: F401

    import coco_accel.model.condenser  # noqa: F401
    import coco_accel.training.batches  # noqa: F401
    import coco_accel.training.build  # noqa: F401
    import coco_accel.training.step  # noqa: F401
    import coco_accel.training.tracking  # noqa: F401
    if deepspeed:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__  # probed once (it runs the compiler), inherited by every rank


def _end_with(body) -> None:
    """Runs `body` in a forked child and ends the child with its exit code: never returns into the code
    the child was forked from."""
    code = 1
    try:
        code = body()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _rank(env: dict, script: str, args: list) -> int:
    os.environ.update(env)
    sys.argv = [script, *args]
    if script == TRAINER:
        runpy.run_module("coco_accel.train", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(script, run_name="__main__")
    return 0


def fork_ranks(nproc: int, port: int, script: str, args: list, addr: str = "127.0.0.1") -> int:
    _preimport(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true")
    sys.stdout.flush()
    sys.stderr.flush()
    pids = {}
    for rank in range(nproc):
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc, "GROUP_RANK": 0,
               "GROUP_WORLD_SIZE": 1, "ROLE_RANK": rank, "ROLE_WORLD_SIZE": nproc, "ROLE_NAME": "default",
               "MASTER_ADDR": addr, "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": 0,
               "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_RUN_ID": "forked"}
        pid = os.fork()
        if pid == 0:
            _end_with(lambda: _rank({k: str(v) for k, v in env.items()}, script, args))
        pids[pid] = rank
    first_failure, deadline = 0, None
    while pids:
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline else os.waitpid(-1, 0)
        if pid == 0:  # others still running after a failure: give them the grace period, then kill
            if time.monotonic() > deadline:
                for other in pids:
                    os.kill(other, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.1)
            continue
        pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first_failure == 0:
            first_failure = code if code > 0 else 128 - code
            for other in pids:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
    return first_failure


def _torchrun(argv: list) -> int:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    if str(args.nnodes) not in ("1", "1:1"):
        raise SystemExit("forked_ranks: one node only; start the real torchrun for several")
    return fork_ranks(int(args.nproc_per_node), int(args.master_port), args.training_script,
                      args.training_script_args, args.master_addr)


def _accelerate(argv: list) -> int:
    from accelerate.commands import launch

    def run_forked(args):
        sys.exit(_torchrun(["--nproc_per_node", str(args.nproc_per_node), "--master_port",
                            str(getattr(args, "master_port", 29500)), args.training_script, *args.training_script_args]))

    launch._run_torchrun = run_forked  # accelerate's launcher has prepared the environment; we start the ranks
    launch.launch_command(launch.launch_command_parser().parse_args(argv))
    return 0


LAUNCHERS = {"torchrun": _torchrun, "accelerate": _accelerate}


def _launch(request: dict) -> int:
    """A served launch, in a child of the server."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # the server's torch set its own
    launcher, *rest = request["argv"]
    return LAUNCHERS[launcher](rest)


def serve() -> int:
    import json
    import select

    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what a library prints must not land in the answers
    _preimport(deepspeed=True)
    running = set()
    while True:
        ready = select.select([sys.stdin], [], [], 0.05)[0]
        if ready:
            line = sys.stdin.readline()
            if not line:
                return 0
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _end_with(lambda: _launch(request))
            running.add(pid)
            answers.write(json.dumps({"pid": pid}) + "\n")
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            answers.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(serve())
    sys.exit(LAUNCHERS[sys.argv[1]](sys.argv[2:]))
