from pathlib import Path

import pytest

from selfforcing.config import ConfigError, config_from_yaml, config_to_yaml, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.steps > 0


def test_recipes_exist():
    assert {p.name for p in CONFIGS} >= {"teacher_toy.yaml", "teacher_demo.yaml"}


def test_overrides_and_yaml_roundtrip():
    cfg = load_config(
        None, ["optim.lr=0.01", "data.colours=[red,blue]", "data.max_objects=2", "model.patch_size=[1,2,2]"]
    )
    assert cfg.optim.lr == 0.01 and cfg.data.colours == ["red", "blue"] and cfg.model.patch_size == (1, 2, 2)
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"optim\.lrr.*not in 'OptimConfig'"),
        ("bogus=1", r"'bogus'.*not in 'TrainConfig'"),
        ("optim.lr=fast", r"optim\.lr.*could not be converted"),
        ("steps=-1", "steps must be >= 1"),
        ("precision=fp8", "precision must be"),
        ("data.height=30", "not divisible by model patch_size"),
        ("model.preset=huge", "unknown preset 'huge'"),
        ("data.source=folder", "needs data.folder"),
        ("data.colours=[red,purple]", "purple"),
        ("steps", "key=value"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 10\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
