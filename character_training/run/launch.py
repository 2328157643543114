"""Training stages on several processes, launched from the recipe's ``launch`` section.

    launch: {config: zero2, processes: 8}                      # every GPU of this machine
    launch: {config: cpu, processes: 2}                        # 2 CPU processes (gloo)
    launch: {config: zero3, processes: 8, machines: 4, main_process_ip: node0, spawn: srun}  # SLURM

The pipeline runs each training stage as a subprocess (``accelerate launch`` with
``scripts/accelerate/CONFIG.yaml``; on the CPU ``torchrun``, since ``accelerate launch --cpu``
starts one process), every process runs the stage through run/worker.py, and the manifest rank 0
writes (``launched-manifest.json``) comes back to the run. The subprocess runs in the current
directory, so the run's relative paths (run_dir, model) mean what they meant to the run; the
accelerate and DeepSpeed configs are given by absolute path. Its output is streamed to the
console and to ``STAGE/launch.log``.

Several machines: every machine runs a launcher for the stage, with its own machine rank, all
meeting at ``main_process_ip``. With ``spawn: srun`` (a run inside a SLURM job,
scripts/slurm/run.sbatch) the run, on the job's first node, starts them all with one ``srun``
per stage (each node's rank: its SLURM_NODEID). With ``spawn: local`` the run starts only its own
machine's (``machine_rank``); the others must be started for each stage by whoever runs them,
with the line the run prints first in STAGE/launch.log and their own rank.

``python -m character_training.run.launch --print CONFIG PROCS [options] -- ENTRY...`` prints the
launcher line that scripts/launch.sh runs: one place builds it.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from character_training.config.sections import LaunchSection
from character_training.errors import UserError

ROOT = Path(__file__).resolve().parents[2]   # the repository: scripts/accelerate/ is here
LAUNCH_LOG = "launch.log"                    # in the stage directory: the launched processes' output
LAUNCHED_MANIFEST = "launched-manifest.json"  # rank 0's manifest, read back and removed by the run
WORKER = ["-m", "character_training.run.worker"]
SLURM_RANK = '"$SLURM_NODEID"'               # under srun: each node's own index, expanded on that node
# Set by a launcher for its processes; left over in the run's environment they would mislead the new ones.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_oversubscribed(section: LaunchSection) -> str | None:
    """A warning (not an error: it runs, slowly) when CPU processes outnumber this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if section.config == "cpu" and section.processes > cores:
        return (f"launch: {section.processes} CPU processes on {cores} cores; they will share cores and train "
                f"slower than {cores}; set launch.processes to at most {cores}")
    return None


def deepspeed_file(config_file: Path) -> Path | None:
    """The DeepSpeed JSON an accelerate config names, resolved against the repository root (the
    configs write it relative to the root, where scripts/launch.sh runs)."""
    import yaml

    data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    name = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    return None if not name else (ROOT / name if not Path(name).is_absolute() else Path(name))


def launch_command(section: LaunchSection, entry: list[str], *, python: str | None = None,
                   absolute: bool = True, machine_rank: str | None = None) -> list[str]:
    """The launcher line that runs ``python ENTRY...`` on the section's processes.

    ``python``: start the launchers as modules of this interpreter (the venv's own torchrun and
    accelerate, whatever PATH says); None: by their command names (scripts/launch.sh).
    ``absolute``: config paths from the repository root, so that the line works from any
    directory; False: relative to the root (scripts/launch.sh runs there).
    ``machine_rank``: the rank as a word for the shell (srun: ``"$SLURM_NODEID"``)."""
    rank = machine_rank or str(section.machine_rank)
    if section.config == "cpu":
        program = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
        if section.machines > 1:
            where = ["--nnodes", str(section.machines), "--node_rank", rank,
                     "--master_addr", section.main_process_ip, "--master_port", str(section.main_process_port)]
        else:
            where = ["--standalone"]
        return [*program, *where, "--nproc_per_node", str(section.processes), *entry]
    program = [python, "-m", "accelerate.commands.launch"] if python else ["accelerate", "launch"]
    relative = Path("scripts") / "accelerate" / f"{section.config}.yaml"
    config = [str(ROOT / relative if absolute else relative)]
    ds = deepspeed_file(ROOT / relative) if absolute else None
    if ds is not None:  # the yaml names it relative to the root; this overrides it (accelerate: CLI over config)
        config += ["--deepspeed_config_file", str(ds)]
    where = ["--num_processes", str(section.total_processes), "--num_machines", str(section.machines),
             "--machine_rank", rank]
    if section.machines > 1:
        where += ["--main_process_ip", section.main_process_ip, "--main_process_port", str(section.main_process_port)]
    return [*program, "--config_file", *config, *where, *entry]


def srun_command(section: LaunchSection, command: list[str]) -> list[str]:
    """One launcher on every node of the SLURM job, each with its node's rank (``SLURM_RANK`` in
    ``command`` is left for that node's shell to expand)."""
    line = " ".join(word if word == SLURM_RANK else shlex.quote(word) for word in command)
    return ["srun", f"--nodes={section.machines}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "bash", "-c", f"exec {line}"]


def stage_command(section: LaunchSection, recipe_file: Path, stage: str, out: Path) -> list[str]:
    """What the run starts for one training stage: the launcher (or srun over the launchers) of
    run/worker.py with this interpreter."""
    entry = [*WORKER, str(recipe_file), stage, str(out)]
    if section.spawn == "srun":
        return srun_command(section, launch_command(section, entry, python=sys.executable, machine_rank=SLURM_RANK))
    return launch_command(section, entry, python=sys.executable)


def launch_env(section: LaunchSection) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    # The workers import this package from wherever it is, even when it is not installed.
    package_root = str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if section.config == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for accelerators first
    return env


def stream(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``command``, its output live on the console and in ``log_path``; its exit status. An
    interrupted run stops the launcher (which stops its processes) before it returns."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with log_path.open("wb") as log:
        log.write(("+ " + shlex.join(command) + "\n").encode())
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:  # srun outside SLURM, or an interpreter that went away
            raise UserError(f"{command[0]}: cannot start the launcher ({exc.strerror}); launch.spawn: srun needs a "
                            "SLURM job (scripts/slurm/run.sbatch); elsewhere use spawn: local") from None
        try:
            while chunk := os.read(process.stdout.fileno(), 1 << 16):  # chunks, not lines: progress bars use \r
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            return process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            process.stdout.close()


ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def last_error(log_path: Path) -> str | None:
    """The line of the log that says why the stage failed: a worker's own error (the CLI's "error:"
    line) first, else the last exception a process raised (not the launcher's summary of it)."""
    with log_path.open("rb") as f:
        f.seek(max(0, log_path.stat().st_size - (1 << 20)))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        match = ERROR_LINE.match(line)
        if match and match.group(1) != "ChildFailedError":
            return f"{match.group(1)}: {match.group(2)}"
    return None


def run_launched(section: LaunchSection, stage: str, recipe_file: Path, out: Path) -> dict:
    """Train ``stage`` on the section's processes; the manifest rank 0 wrote, as the in-process
    stage function would return it. A failure is one line naming the log; the run's other stage
    directories are not touched."""
    out = Path(out)
    warning = cpu_oversubscribed(section)
    if warning:
        print(f"[{stage}] warning: {warning}", file=sys.stderr, flush=True)
    log_path = out / LAUNCH_LOG
    (out / LAUNCHED_MANIFEST).unlink(missing_ok=True)
    code = stream(stage_command(section, Path(recipe_file), stage, out), log_path, launch_env(section))
    machines = f"{section.machines} machine{'s' if section.machines > 1 else ''}"
    where = f"{section.total_processes} processes ({section.config}, {machines})"
    if code != 0:
        reason = last_error(log_path)
        reason = f": {reason if len(reason) <= 400 else reason[:400] + '...'}" if reason else ""
        raise UserError(f"{stage}: the launched stage failed on {where} with exit code {code}{reason}; the whole "
                        f"output is in {log_path}; earlier stages are kept: fix the cause and run again")
    manifest_path = out / LAUNCHED_MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{stage}: the launched stage exited 0 on {where} but rank 0 wrote no {LAUNCHED_MANIFEST}; "
                        f"see {log_path}; run again (a launcher that did not start run/worker.py ends like this)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest_path.unlink()
    return manifest


def _print_main(argv: list[str]) -> int:
    """``--print CONFIG PROCS [--machines N --machine-rank R --main-process-ip IP --main-process-port P]
    -- ENTRY...``: the launcher line by command names, paths relative to the root (scripts/launch.sh)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m character_training.run.launch --print")
    parser.add_argument("config")
    parser.add_argument("processes", type=int)
    parser.add_argument("--machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--main-process-ip")
    parser.add_argument("--main-process-port", type=int, default=29500)
    split = argv.index("--") if "--" in argv else len(argv)
    args, entry = parser.parse_args(argv[:split]), argv[split + 1:]
    try:
        section = LaunchSection(config=args.config, processes=args.processes, machines=args.machines,
                                machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                                main_process_port=args.main_process_port)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(shlex.join(launch_command(section, entry, absolute=False)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--print"]:
        print("usage: python -m character_training.run.launch --print CONFIG PROCS [options] -- ENTRY...",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(_print_main(sys.argv[2:]))
