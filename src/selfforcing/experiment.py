"""The paper's ablation in miniature: every training paradigm and loss, chunk-wise and frame-wise, from
the same teacher and the same ODE pairs, then ``selfforcing eval`` on all of them.

Stages, each in ``out_dir/<stage>``, each resumable and skipped once finished (like the recipe):

- ``pairs``: teacher trajectories at the students' four levels (shared by both granularities);
- ``ode_init_chunk`` / ``ode_init_frame``: the ODE-initialised few-step students (3 / 1 latent frames
  per chunk), the same steps each;
- ``{method}_{chunk|frame}`` for the methods in ``METHODS``: the many-step Teacher/Diffusion Forcing
  models start from the teacher; TF/DF + DMD and Self Forcing + DMD/SiD/GAN from that granularity's ODE
  student;
- ``eval_chunk`` / ``eval_frame``: ``selfforcing eval`` rows of that granularity's models (each under an
  hour on 2 cores; the rows are kept in ``eval/rows`` and reused);
- ``eval``: the teacher (reference) and every model above, at 1x/2x/4x length, over several seeds;
  ``eval/ablation.md`` lays the figures out like the paper's ablation (``ablation_table``), and
  ``eval/drift_{chunk|frame}.png`` and ``eval/compare_{chunk|frame}_{n}x.gif`` show real videos, the ODE
  student and every method of one granularity: frame ok over frame index, and videos side by side.

Budget: every method makes the same number of generator updates counted from the teacher. A few-step
method makes ``ode_steps`` (its ODE init) + ``updates``; a many-step one makes ``ode_steps + updates``
diffusion updates from the teacher directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, TrainConfig, load_config
from .recipe import CONFIGS, is_finished, pair_settings, train_stage
from .training.ode_pairs import generate_ode_pairs, is_complete

TEACHER = Path(__file__).resolve().parent / "assets" / "teacher_toy"
GRANULARITIES = {"chunk": 3, "frame": 1}  # latent frames per chunk
# method -> (recipe file, starts from the ODE student (True) or the teacher (False))
METHODS = {
    "tf_diffusion": ("tf_diffusion_toy.yaml", False),
    "df_diffusion": ("df_diffusion_toy.yaml", False),
    "tf_dmd": ("tf_dmd_toy.yaml", True),
    "df_dmd": ("df_dmd_toy.yaml", True),
    "sf_dmd": ("sf_dmd_toy.yaml", True),
    "sf_sid": ("sf_sid_toy.yaml", True),
    "sf_gan": ("sf_gan_toy.yaml", True),
}


@dataclass
class ExperimentSettings:
    ode_steps: int = 2000  # ODE-init updates of each few-step student
    updates: int = 200  # generator updates after the ODE init (critic steps = updates x ratio)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    granularities: list[str] = field(default_factory=lambda: list(GRANULARITIES))
    num_pairs: int = 1280
    eval_num: int = 128  # prompts per seed: real videos' FD floor is about 20 here, models' hundreds
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_lengths: list[int] = field(default_factory=lambda: [1, 2, 4])
    encoder: str = ""  # video encoder for the FD ("" = the shipped toy one)
    overrides: list[str] = field(default_factory=list)  # key=value for every training stage
    pair_overrides: list[str] = field(default_factory=list)  # key=value ODE-pair settings

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS] + [g for g in self.granularities if g not in GRANULARITIES]
        if bad:
            raise ConfigError(
                f"unknown method/granularity {bad}: methods {list(METHODS)}, granularities {list(GRANULARITIES)}"
            )


def stage_configs(
    out: Path, settings: ExperimentSettings, teacher: Path, device: str = "auto"
) -> dict[str, TrainConfig]:
    """Every training stage's config, in the order they run (ODE students first)."""
    common = [f"out_dir={out}", f"device={device}", *settings.overrides]
    configs: dict[str, TrainConfig] = {}
    for gran in settings.granularities:
        fpb = f"causal.frames_per_block={GRANULARITIES[gran]}"
        configs[f"ode_init_{gran}"] = load_config(
            CONFIGS / "ode_init_toy.yaml",
            [
                *common,
                f"name=ode_init_{gran}",
                fpb,
                f"init_from={teacher}",
                f"ode.pairs={out / 'pairs'}",
                f"steps={settings.ode_steps}",
            ],
        )
    for gran in settings.granularities:
        fpb = f"causal.frames_per_block={GRANULARITIES[gran]}"
        for method in settings.methods:
            recipe, from_student = METHODS[method]
            name = f"{method}_{gran}"
            if from_student:
                probe = load_config(CONFIGS / recipe, [])
                steps = settings.updates * probe.distill.critic_steps_per_generator_step
                start = [f"init_from={out / f'ode_init_{gran}'}", f"distill.teacher={teacher}"]
            else:
                steps = settings.ode_steps + settings.updates
                start = [f"init_from={teacher}"]
            configs[name] = load_config(CONFIGS / recipe, [*common, f"name={name}", fpb, *start, f"steps={steps}"])
    return configs


def run_experiment(
    out_dir: str | Path,
    settings: ExperimentSettings | None = None,
    teacher: str | Path = TEACHER,
    only: list[str] | None = None,
    device: str = "auto",
) -> dict[str, Path]:
    """Run (or finish) the stages, or only those named in ``only``; returns each finished stage's folder."""
    from .device import resolve_device
    from .eval.evaluate import EvalSettings, evaluate, write_comparison, write_report
    from .eval.plots import plot_drift_curves

    settings = settings or ExperimentSettings()
    settings.validate()
    out, teacher = Path(out_dir), Path(teacher)
    configs = stage_configs(out, settings, teacher, device)
    names = stage_names(configs, settings)
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"unknown experiment stage(s) {unknown}: the stages are {names}")
    wanted = set(only or names)
    done: dict[str, Path] = {}

    pairs = pair_settings(next(iter(configs.values())), [f"num_samples={settings.num_pairs}", *settings.pair_overrides])
    if "pairs" in wanted and not is_complete(out / "pairs", pairs):
        print(f"[experiment] pairs: sampling {pairs.num_samples} teacher trajectories into {out / 'pairs'}")
        generate_ode_pairs(teacher, out / "pairs", pairs, device=resolve_device(device))
    done["pairs"] = out / "pairs"
    for name, cfg in configs.items():
        if name in wanted:
            done[name] = train_stage(cfg)
    eval_settings = EvalSettings(settings.eval_lengths, settings.eval_num, settings.eval_seeds)
    if settings.encoder:
        eval_settings.encoder = settings.encoder

    def trained(stage: str, models: list[str]) -> list[str]:
        missing = [n for n in models if not is_finished(configs[n])]
        if missing:
            raise ConfigError(f"{stage} needs these models trained first: {missing} (run those stages)")
        return [str(configs[n].run_dir) for n in models]

    for gran in settings.granularities:
        if f"eval_{gran}" in wanted:  # rows only (kept in eval/rows); the report comes with `eval`
            models = trained(f"eval_{gran}", [n for n in configs if n.endswith(f"_{gran}")])
            evaluate(models, eval_settings, out / "eval")
            done[f"eval_{gran}"] = out / "eval"
    if "eval" in wanted:
        checkpoints = [str(teacher), *trained("eval", list(configs))]
        summary = write_report(evaluate(checkpoints, eval_settings, out / "eval"), out / "eval")
        tables = [f"## {n}x the training length\n\n{ablation_table(summary, n)}" for n in settings.eval_lengths]
        (out / "eval" / "ablation.md").write_text("\n".join(tables))
        for gran in settings.granularities:  # real, ODE student, then every method: curves and side by side
            models = ["real", *(f"{m}_{gran}" for m in ["ode_init", *settings.methods])]
            plot_drift_curves([r for r in summary if r["model"] in models], out / "eval" / f"drift_{gran}.png")
            for mult in settings.eval_lengths:
                gif = out / "eval" / f"compare_{gran}_{mult}x.gif"  # 3 prompts, scale 2: ~2 MB at 4x
                write_comparison(out / "eval", models, mult, gif, num=3, scale=2)
        done["eval"] = out / "eval"
    return done


def stage_names(configs: dict[str, TrainConfig], settings: ExperimentSettings) -> list[str]:
    """Every stage in the order it runs: pairs, the trainings, the evaluations."""
    return ["pairs", *configs, *(f"eval_{g}" for g in settings.granularities), "eval"]


ABLATION_COLUMNS = (
    ("frame ok", "frame_ok", 3),
    ("drift", "frame_ok_change", 3),
    ("late drift", "frame_ok_late_change", 3),
    ("FD", "fd", 1),
)


def ablation_table(summary: list[dict], length: int) -> str:
    """The paper's ablation layout for one video length: rows = methods, columns = chunk-wise and
    frame-wise x (frame ok, drift = last - first quarter of frame ok, late drift = last - second
    quarter, FD), mean ± spread over seeds.
    ``summary``: rows of ``eval.evaluate.aggregate`` whose models are named ``{method}_{granularity}``."""
    by_name = {r["model"]: r for r in summary if r["length"] == length}
    head = [f"{g}-wise {label}" for g in GRANULARITIES for label, _, _ in ABLATION_COLUMNS]
    lines = ["| method | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    references = [n for n in by_name if not any(n.endswith(f"_{g}") for g in GRANULARITIES)]
    for method in [*references, "ode_init", *METHODS]:
        cells = []
        for gran in GRANULARITIES:
            row = by_name.get(method) if method in references else by_name.get(f"{method}_{gran}")
            for _, key, digits in ABLATION_COLUMNS:
                cells.append("—" if row is None else f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}")
        if any(c != "—" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
