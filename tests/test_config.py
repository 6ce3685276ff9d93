"""Recipe loading, overrides and every configuration error, all before a model exists."""

from pathlib import Path

import pytest

from torchtrain.config import Config, ConfigError, load_config, parse_args

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(REPO.joinpath("recipes").glob("*.toml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    config = load_config(recipe)
    assert config.source == str(recipe)


def test_defaults_and_toml_values(tmp_path):
    config = load_config(write(tmp_path, "[training]\nsteps = 17\nmax_norm = 2\n[optimizer]\nbetas = [0.8, 0.9]\n"))
    assert config.training.steps == 17
    assert config.training.max_norm == 2.0 and isinstance(config.training.max_norm, float)
    assert config.optimizer.betas == [0.8, 0.9]
    assert config.training.seq_len == Config().training.seq_len


def test_overrides_both_forms_with_type_conversion(tmp_path):
    path, overrides = parse_args(["--config", str(write(tmp_path, "")), "--training.steps", "12",
                                  "--optimizer.lr=1e-3", "--compile.enabled", "false",
                                  "--job.output_dir=/tmp/x", "--optimizer.betas", "[0.5, 0.6]"])
    config = load_config(path, overrides)
    assert config.training.steps == 12
    assert config.optimizer.lr == 1e-3
    assert config.compile.enabled is False
    assert config.job.output_dir == "/tmp/x"
    assert config.optimizer.betas == [0.5, 0.6]


def test_override_beats_recipe(tmp_path):
    config = load_config(write(tmp_path, "[training]\nsteps = 15\n"), ["--training.steps=19"])
    assert config.training.steps == 19


def test_unknown_section_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.toml.*unknown section \[trainig\].*'training'"):
        load_config(write(tmp_path, "[trainig]\nsteps = 5\n"))


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.toml.*training\.step\b.*'steps'"):
        load_config(write(tmp_path, "[training]\nstep = 5\n"))


def test_unknown_override_key_names_closest():
    with pytest.raises(ConfigError, match=r"command line.*optimizer\.learning_rate.*keys of \[optimizer\]"):
        load_config(None, ["--optimizer.learning_rate", "1"])


def test_wrong_type_names_file_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.toml: training\.steps = 'ten' is not a valid integer"):
        load_config(write(tmp_path, '[training]\nsteps = "ten"\n'))
    with pytest.raises(ConfigError, match=r"--training\.steps.*'1.5' is not a valid integer"):
        load_config(None, ["--training.steps", "1.5"])
    with pytest.raises(ConfigError, match=r"compile\.enabled.*boolean"):
        load_config(None, ["--compile.enabled", "maybe"])


def test_invalid_choice_lists_valid_ones(tmp_path):
    import torch

    from torchtrain.checks import check_run
    from torchtrain.models import get_model_args

    config = load_config(write(tmp_path, '[lr_scheduler]\nname = "cosin"\n'))  # the optimizer module's list
    with pytest.raises(ConfigError, match=r"recipe\.toml: lr_scheduler\.name = 'cosin' is invalid; valid choices: "
                                          r"'cosine', 'linear', 'wsd'"):
        check_run(config, get_model_args("debug"), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"training\.device = 'gpu' is invalid; valid choices: 'auto', 'cuda', 'cpu'"):
        load_config(write(tmp_path, '[training]\ndevice = "gpu"\n'))


def test_invalid_values(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.local_batch_size = 0.*positive"):
        load_config(None, ["--training.local_batch_size", "0"])
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_config(None, ["--data.val_fraction", "1.5"])
    with pytest.raises(ConfigError, match=r"optimizer\.betas"):
        load_config(None, ["--optimizer.betas", "[0.9]"])


def test_unknown_model_name_lists_choices():
    with pytest.raises(ConfigError, match=r"model\.name = 'llama2-7b' is invalid; valid choices: .*llama2_7b.*"
                                          r"Did you mean 'llama2_7b'"):
        load_config(None, ["--model.name", "llama2-7b"])


def test_seq_len_beyond_model_limit():
    with pytest.raises(ConfigError, match=r"training\.seq_len = 100000 is invalid; model 'llama2_7b' supports at most "
                                          r"4096 tokens"):
        load_config(None, ["--model.name", "llama2_7b", "--training.seq_len", "100000"])


def test_missing_recipe_names_path_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe .*nope\.toml' does not exist"):
        load_config(tmp_path / "nope.toml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="overrides look like --section.key value"):
        load_config(None, ["training.steps=3"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(None, ["--training.steps"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, '[job]\nname = "x"\n[optimizer]\nlr = 0.01\n'), ["--training.steps=30"])
    saved = tmp_path / "resolved.toml"
    saved.write_text(config.to_toml())
    again = load_config(saved)
    assert again.to_dict() == config.to_dict()


def test_longer_context_than_the_model_needs_model_max_seq_len():
    import torch

    from torchtrain.models.shape import model_args_for

    recipe = Path(__file__).parent.parent / "recipes/debug.toml"
    with pytest.raises(ConfigError, match=r"training.seq_len = 4096 is invalid; model 'debug' supports at most 2048 "
                                          r"tokens; to train longer sequences set model.max_seq_len"):
        load_config(recipe, ["--training.seq_len", "4096"])
    with pytest.raises(ConfigError, match=r"model.max_seq_len = 3000 is invalid; it must be 0 .* or at least "
                                          r"training.seq_len \(4096\)"):
        load_config(recipe, ["--training.seq_len", "4096", "--model.max_seq_len", "3000"])
    config = load_config(recipe, ["--training.seq_len", "4096", "--model.max_seq_len", "8192",
                                  "--model.rope_theta", "500000"])
    args = model_args_for(config, torch.device("cpu"))
    assert (args.max_seq_len, args.rope_theta) == (8192, 500000.0)


def test_shipped_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("debug", "debug.toml", "recipes/debug.toml"):
        config = load_config(given)
        assert Path(config.source).resolve() == (REPO / "recipes/debug.toml").resolve() and config.job.name == "debug"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/debug.toml").write_text('[job]\nname = "mine"\n')
    assert load_config("recipes/debug.toml").job.name == "mine"  # a file that exists is always the one read
    with pytest.raises(ConfigError, match=r"recipe 'nope.toml' does not exist.*debug, internlm_7b_2k"):
        load_config("nope.toml")
    with pytest.raises(ConfigError, match=r"recipe 'elsewhere/debug.toml' does not exist"):
        load_config("elsewhere/debug.toml")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_numbers_are_refused_from_the_command_line(value):
    with pytest.raises(ConfigError, match=rf"optimizer.lr = '{value}' is not a valid finite number"):
        load_config(REPO / "recipes/debug.toml", ["--optimizer.lr", value])


def test_non_finite_numbers_are_refused_from_a_recipe(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[optimizer]\nlr = nan\n[training]\nmax_norm = inf\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: optimizer.lr = nan is not a valid finite number"):
        load_config(recipe)
    recipe.write_text("[optimizer]\nbetas = [0.9, nan]\n")
    with pytest.raises(ConfigError, match=r"optimizer.betas = \[0.9, nan\] is not a valid list of finite number"):
        load_config(recipe)
