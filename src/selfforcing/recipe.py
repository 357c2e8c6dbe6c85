"""The whole Self Forcing recipe in one call: teacher -> ODE pairs -> ODE init -> Self Forcing.

Each stage writes into ``out_dir/<stage>`` and resumes what a previous call left: a finished training
run (its checkpoint at the last step) is skipped outright, an unfinished one continues from its latest
checkpoint, and the ODE-pair folder keeps its finished shards. Calling the recipe again after a crash
(or after it finished) therefore loses nothing and redoes nothing.

Stage settings come from the recipe files in ``configs/`` plus ``key=value`` overrides per stage::

    run_recipe("runs/recipe", loss="dmd", overrides={"teacher": ["steps=2000"], "pairs": ["num_samples=256"]})
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from .config import ConfigError, TrainConfig, config_from_yaml, load_config
from .training.ode_pairs import ODEPairSettings, generate_ode_pairs, is_complete
from .weights import checkpoint_step, latest_checkpoint, resolve_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = ("teacher", "pairs", "ode_init", "self_forcing")
LOSSES = ("dmd", "sid", "gan")


def recipe_files(loss: str = "dmd") -> dict[str, Path]:
    """The recipe file of each training stage (the toy shapes world)."""
    if loss not in LOSSES:
        raise ValueError(f"the recipe's Self Forcing loss must be one of {LOSSES}, got {loss!r}")
    return {
        "teacher": CONFIGS / "teacher_toy.yaml",
        "ode_init": CONFIGS / "ode_init_toy.yaml",
        "self_forcing": CONFIGS / f"sf_{loss}_toy.yaml",
    }


def is_finished(cfg: TrainConfig) -> bool:
    """True when the run folder already holds the checkpoint of the run's last step."""
    ckpt = latest_checkpoint(cfg.run_dir)
    return ckpt is not None and checkpoint_step(ckpt) >= cfg.steps


def pair_settings(student: TrainConfig, overrides: list[str]) -> ODEPairSettings:
    """ODE-pair settings at the student's few-step levels, with ``key=value`` overrides."""
    settings = ODEPairSettings(
        num_samples=1280, student_steps=tuple(student.causal.denoising_steps), student_shift=student.causal.shift
    )
    allowed = sorted(f.name for f in fields(ODEPairSettings) if not f.name.startswith("student_"))
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ConfigError(f"pairs: {key!r} is not an ODE-pair setting; use one of {allowed}")
        settings = replace(settings, **{key: type(getattr(settings, key))(value)})
    return settings


def causal_student(path: str | Path) -> Path:
    """The checkpoint folder of a causal student to start Self Forcing from; a teacher is refused."""
    ckpt = resolve_checkpoint(path)
    cfg = config_from_yaml((ckpt / "config.yaml").read_text())
    if cfg.causal is None:
        raise ConfigError(
            f"--init {path}: {ckpt} is a bidirectional {cfg.stage} model; give a causal student (an ODE-initialised "
            "or Self Forcing checkpoint, e.g. student_toy or sf_dmd_chunk_toy)"
        )
    return ckpt


def train_stage(cfg: TrainConfig) -> Path:
    """Train one stage unless it is finished; returns its run folder."""
    from .training.trainer import Trainer

    if is_finished(cfg):
        print(f"[recipe] {cfg.name}: finished already ({cfg.steps} steps in {cfg.run_dir}), skipped")
        return cfg.run_dir
    print(f"[recipe] {cfg.name}: training {cfg.steps} steps into {cfg.run_dir}")
    return Trainer(cfg).train()


def run_recipe(
    out_dir: str | Path,
    loss: str = "dmd",
    teacher: str | Path | None = None,
    overrides: dict[str, list[str]] | None = None,
    device: str = "auto",
    init: str | Path | None = None,
) -> dict[str, Path]:
    """Run (or finish) every stage; returns each stage's output folder.

    teacher: an already trained bidirectional teacher (e.g. ``src/selfforcing/assets/teacher_toy``)
    instead of training one. init: a causal student to start Self Forcing from (a checkpoint or run folder,
    or a shipped one such as ``student_toy`` or ``sf_dmd_chunk_toy``) instead of the ODE pairs and the ODE
    initialisation. overrides: per stage (``teacher``, ``pairs``, ``ode_init``, ``self_forcing``),
    ``key=value`` items for that stage's config (``pairs``: ``ODEPairSettings``).
    """
    from .device import resolve_device

    overrides = overrides or {}
    unknown = set(overrides) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown recipe stage(s) {sorted(unknown)}: the stages are {STAGES}")
    out, files = Path(out_dir), recipe_files(loss)

    def config(stage: str, *fixed: str) -> TrainConfig:
        common = [f"out_dir={out}", f"name={stage}", f"device={device}"]
        return load_config(files[stage], [*common, *fixed, *overrides.get(stage, [])])

    done: dict[str, Path] = {}
    if teacher is None:
        done["teacher"] = train_stage(config("teacher"))
    else:
        if overrides.get("teacher"):
            raise ConfigError("teacher: overrides were given for a teacher that is not trained (--teacher)")
        done["teacher"] = Path(teacher)
    if init is not None:
        if overrides.get("pairs") or overrides.get("ode_init"):
            raise ConfigError("pairs/ode_init: overrides were given for stages that --init skips")
        done["ode_init"] = causal_student(init)
        print(f"[recipe] pairs, ode_init: Self Forcing starts from {done['ode_init']}, skipped")
    else:
        student = config("ode_init", f"init_from={done['teacher']}", f"ode.pairs={out / 'pairs'}")
        settings = pair_settings(student, overrides.get("pairs", []))
        if is_complete(out / "pairs", settings):
            print(f"[recipe] pairs: {settings.num_samples} ODE pairs are in {out / 'pairs'} already, skipped")
            done["pairs"] = out / "pairs"
        else:
            print(f"[recipe] pairs: sampling {settings.num_samples} teacher trajectories into {out / 'pairs'}")
            done["pairs"] = generate_ode_pairs(done["teacher"], out / "pairs", settings, device=resolve_device(device))
        done["ode_init"] = train_stage(student)
    sf = config("self_forcing", f"init_from={done['ode_init']}", f"distill.teacher={done['teacher']}")
    done["self_forcing"] = train_stage(sf)
    print("[recipe] done: " + ", ".join(f"{k} -> {v}" for k, v in done.items()))
    return done
