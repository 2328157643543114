"""The recipe's sections that are not one stage's own settings class: the generation stages'
sections (``GenSection``, one per data stage beyond prompts and pairs; ``GenStage``: what each
of those stages is, given in its row of the stage table, config/stages.py), the ``backend`` and ``models`` sections (models by role), and the
``launch`` section (training stages on several processes). They live in config/ so that the
recipe is read and checked without importing what runs it (run/generation.py serves the roles,
run/launch.py launches the processes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from character_training.errors import UserError
from data_gen.backends import Sampling

CONFIGS = ("cpu", "ddp", "zero2", "zero3")
SPAWNS = ("local", "srun")


@dataclass(frozen=True)
class GenStage:
    run: Callable[..., dict]     # the stage's function in data_gen.stages
    settings: type               # the stage's settings dataclass: its recipe section's flat keys
    sampling: Sampling           # the stage's default sampling
    needs_prompts: bool = False  # takes the prompts stage's training prompts (or --prompts)
    takes_judge: bool = False
    takes_adapter: bool = False
    needs_principles: bool = False  # judges or critiques against the constitution's principles
    role: str = "teacher"        # whose backend the stage writes with (with an adapter: the student's)
    takes_student: bool = False  # the student answers first (critique: the answer it critiques and revises)




@dataclass(frozen=True)
class GenSection:
    """A generation stage's recipe section. In the recipe the settings' fields are written flat,
    beside ``sampling`` and ``adapter``; ``recipe.gen_section`` builds it, ``as_recipe`` writes it
    back in that shape."""

    settings: Any                # the stage's settings dataclass (its GenStage's settings)
    sampling: Sampling           # keys the recipe leaves out keep the stage's default (its GenStage's sampling)
    adapter: str | None = None   # reflection, interaction: a PEFT LoRA directory, or 'previous': the run's latest

    @classmethod
    def default(cls, spec: GenStage) -> GenSection:
        return cls(settings=spec.settings(), sampling=spec.sampling)

    def as_recipe(self, spec: GenStage) -> dict:
        """The section as a recipe writes it (every value, defaults included)."""
        data = {**dataclasses.asdict(self.settings), "sampling": dataclasses.asdict(self.sampling)}
        if spec.takes_adapter:
            data["adapter"] = self.adapter
        return data


@dataclass
class BackendSection:
    kind: str = "vllm"           # vllm: the offline engine in this process; openai: HTTP servers
    base_urls: list = field(default_factory=list)  # openai: e.g. [http://127.0.0.1:8000/v1, ...]
    served_model: str | None = None  # openai: the model name the servers serve (default: the role's model)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never written anywhere
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 4
    # openai: send each request's seed (data_gen/seeds.py: reproducible samples, paired conditions). A
    # vLLM server on a CPU needs `--no-enable-chunked-prefill` for them (a chunked prefill rewinds a
    # seeded request's generator, which the CPU generator cannot do); false sends none.
    request_seeds: bool = True
    # vllm: vLLM's own engine options (its EngineArgs fields: tensor_parallel_size, data_parallel_size,
    # gpu_memory_utilization, max_model_len, quantization, max_num_seqs, max_lora_rank, ...).
    engine: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("vllm", "openai"):
            raise UserError(f"kind: '{self.kind}' is not a backend; use 'vllm' or 'openai'")
        if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.base_urls):
            raise UserError("base_urls: each must be a server's URL starting with http:// or https://, "
                            "e.g. [http://127.0.0.1:8000/v1]")
        if self.max_concurrency < 1:
            raise UserError(f"max_concurrency: {self.max_concurrency}; give 1 or more (requests in flight)")
        if not self.timeout_s > 0:
            raise UserError(f"timeout_s: {self.timeout_s}; give a number of seconds above 0 (120 is usual)")
        if self.max_retries < 0:
            raise UserError(f"max_retries: {self.max_retries}; give 0 or more")
        if self.engine:
            from data_gen.backends import check_engine_options

            self.engine = check_engine_options(self.engine, "engine")


ROLES = ("student", "teacher", "judge")
ROLE_DEFAULTS = {"teacher": "student", "judge": "teacher"}  # a role with no model is the role it defaults to


@dataclass
class RoleSection:
    """One role's model, and the ``backend`` keys it is served with where they differ from the
    recipe's ``backend`` section. In a recipe a role may also be written as just its model."""

    model: str | None = None     # a model directory or hub id (openai: the served name); null: the default
    backend: dict = field(default_factory=dict)  # e.g. {kind: openai, base_urls: [...]} or {engine: {...}}


@dataclass
class ModelsSection:
    student: RoleSection = field(default_factory=RoleSection)  # trained; default: the recipe's `model`
    teacher: RoleSection = field(default_factory=RoleSection)  # answers with the constitution; default: student
    judge: RoleSection = field(default_factory=RoleSection)    # judges; default: the teacher


def role_backends(models: ModelsSection, backend: BackendSection, build, where: str = "") -> dict[str, BackendSection]:
    """Each role's backend section (``build(mapping, prefix)`` builds and checks one); a role
    without a model starts from the backend of the role it defaults to. A teacher or judge with a
    model of its own is never silently served as another model (``check_served``)."""
    found: dict[str, BackendSection] = {}
    for name in ROLES:
        section = getattr(models, name)
        start = found[ROLE_DEFAULTS[name]] if name in ROLE_DEFAULTS and section.model is None else backend
        if not section.backend:
            found[name] = start
        else:
            merged = {**dataclasses.asdict(start), **section.backend}
            if isinstance(section.backend.get("engine"), dict):  # engine options: the role's over the recipe's
                merged["engine"] = {**start.engine, **section.backend["engine"]}
            found[name] = build(merged, f"models.{name}.backend.")
        check_served(name, section, found[name], where)
    return found


def check_served(name: str, section: RoleSection, backend: BackendSection, where: str = "") -> None:
    """Over HTTP a role's model is the name its servers serve. A teacher or judge with a model of
    its own and a ``served_model`` that names another would ask the servers for the other model:
    the role would silently be someone else (the pairs' teacher the student), so it is refused."""
    if name == ROLES[0] or section.model is None or backend.kind != "openai":
        return
    if backend.served_model and backend.served_model != section.model:
        given = f"models.{name}.backend.served_model" if "served_model" in section.backend else "backend.served_model"
        raise UserError(f"{where + ': ' if where else ''}models.{name}.model: '{section.model}' is served over HTTP, "
                        f"but {given}: '{backend.served_model}' names the model its servers serve, so every {name} "
                        f"request would go to '{backend.served_model}'; drop {given} (over HTTP a role's model is the "
                        f"name its servers serve), or give the {name} its own servers: "
                        f"models.{name}.backend: {{base_urls: [...], served_model: null}}")


@dataclass
class LaunchSection:
    config: str | None = None    # cpu | ddp | zero2 | zero3 (scripts/accelerate/CONFIG.yaml); null: one process
    processes: int = 1           # processes on each machine (GPUs: one per GPU)
    machines: int = 1
    machine_rank: int = 0        # this machine's rank; the run's machine is 0 unless another runs the pipeline
    main_process_ip: str | None = None   # rank 0's address, needed with machines > 1
    main_process_port: int = 29500
    spawn: str = "local"         # local: this machine's launcher only; srun: one per node of the SLURM job

    def __post_init__(self):
        if self.config is not None and self.config not in CONFIGS:
            raise UserError(f"config: '{self.config}' is not a launch configuration; use one of {', '.join(CONFIGS)} "
                            "(scripts/accelerate/ has the GPU ones), or null for one process")
        for name in ("processes", "machines"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: {getattr(self, name)}; it counts processes or machines, so it must be "
                                "at least 1")
        if not 0 <= self.machine_rank < self.machines:
            raise UserError(f"machine_rank: {self.machine_rank} with machines: {self.machines}; a machine's rank "
                            f"is from 0 to {self.machines - 1}")
        if self.machines > 1 and not self.main_process_ip:
            raise UserError(f"machines: {self.machines} needs main_process_ip: the address of the machine with "
                            "machine_rank 0, where every machine's processes meet")
        if not 1 <= self.main_process_port <= 65535:
            raise UserError(f"main_process_port: {self.main_process_port} is not a port; use 1-65535 (e.g. 29500)")
        if self.spawn not in SPAWNS:
            raise UserError(f"spawn: '{self.spawn}' is not a way to start the machines' launchers; use local "
                            "(each machine starts its own) or srun (inside a SLURM job: every node, from the run)")
        if self.spawn == "srun" and self.machine_rank != 0:
            raise UserError(f"spawn: srun with machine_rank: {self.machine_rank}; with srun the run is on the "
                            "job's first node (rank 0) and each node's rank is its SLURM_NODEID; drop machine_rank")

    @property
    def enabled(self) -> bool:
        return self.config is not None

    @property
    def total_processes(self) -> int:
        return self.processes * self.machines
