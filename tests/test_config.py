"""The recipe: reference flags, YAML, and errors that name the field and the fix."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from coco_accel.training.config import ConfigError, TrainConfig, parse_config

REQUIRED = ["--output_dir", "o", "--model_name_or_path", "m", "--train_dir", "t"]

REFERENCE_COMMAND = """--output_dir out --model_name_or_path cond --do_train --save_steps 30000 --model_type bert
 --per_device_train_batch_size 200 --gradient_accumulation_steps 1 --fp16 --warmup_ratio 0.1 --learning_rate 1e-4
 --num_train_epochs 8 --dataloader_drop_last --overwrite_output_dir --dataloader_num_workers 32 --n_head_layers 2
 --skip_from 6 --max_seq_length 128 --train_dir data --weight_decay 0.01 --late_mlm""".split()


def test_the_reference_command_line_parses_with_its_meaning():
    cfg = parse_config(REFERENCE_COMMAND)
    assert cfg.data.per_device_train_batch_size == 200 and cfg.compute.fp16 and cfg.model.late_mlm
    assert cfg.data.dataloader_drop_last
    assert cfg.model.skip_from == 6 and cfg.optim.learning_rate == 1e-4 and cfg.optim.num_train_epochs == 8
    assert cfg.io.model_type == "bert" and cfg.checkpoints.save_steps == 30000


def test_help_lists_every_reference_flag():
    out = subprocess.run([sys.executable, "coco_accel/train.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--output_dir --model_name_or_path --do_train --save_steps --model_type "
                 "--per_device_train_batch_size --gradient_accumulation_steps --fp16 --bf16 --warmup_ratio "
                 "--learning_rate --num_train_epochs --max_steps --dataloader_drop_last --overwrite_output_dir "
                 "--dataloader_num_workers --n_head_layers --skip_from --max_seq_length --train_dir --weight_decay "
                 "--late_mlm --mlm_probability --seed --logging_steps --max_grad_norm --cache_chunk_size").split():
        assert flag in out, flag


def test_run_as_a_file_it_imports_as_the_package_with_its_flags_and_arguments(tmp_path):
    # Run as a file, Python puts the file's folder first on the import path, where the package's own
    # subpackages (model, training, evaluation, ...) would be what `import model` finds for every library.
    # An installed package of that name (here on PYTHONPATH) must win; the process is the one started (no
    # re-execution). A startup hook records, at the process's exit, its command line, what `model` resolves
    # to and whether the package's folder is on the path.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, importlib.util, json, os, sys\n"
        "def _record():\n"
        "    spec = importlib.util.find_spec('model')\n"
        "    with open(os.environ['RECORD'], 'w') as fh:\n"
        "        json.dump({'argv': sys.orig_argv, 'model': spec and spec.origin, 'path': sys.path}, fh)\n"
        "atexit.register(_record)\n")
    record = tmp_path / "record.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RECORD": str(record)}
    done = subprocess.run([sys.executable, "-W", "ignore::UserWarning", "coco_accel/train.py", "--help"], env=env,
                          capture_output=True, text=True, check=True)
    assert "--per_device_train_batch_size" in done.stdout
    seen = json.loads(record.read_text())
    assert seen["argv"][1:] == ["-W", "ignore::UserWarning", "coco_accel/train.py", "--help"]
    assert seen["model"] == str(tmp_path / "model" / "__init__.py"), seen
    assert str(REPO / "coco_accel") not in [os.path.realpath(p) for p in seen["path"]]


def test_yaml_sets_fields_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 3.0e-4\nlate_mlm: true\nskip_from: 3\n")
    cfg = parse_config(REQUIRED + ["--config", str(recipe), "--skip_from", "4"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.model.late_mlm and cfg.model.skip_from == 4
    assert parse_config(REQUIRED + ["--late_mlm", "false", "--config", str(recipe)]).model.late_mlm is False


@pytest.mark.parametrize("argv, match", [
    (["--learning_rat", "1e-4"], "Did you mean --learning_rate"),
    (["--skip_from", "six"], "skip_from"),
    (["--gradient_accumulation_steps", "4"], "cache_chunk_size"),
    (["--fp16", "--bf16"], "choose one"),
    (["--mlm_probability", "1.5"], "mlm_probability"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--cache_chunk_size", "0"], "cache_chunk_size"),
    (["--head_init", "backbone"], r"--head_init: invalid choice: 'backbone' \(choose from 'random', 'copy'\)"),
])
def test_bad_flags_name_the_flag_and_the_fix(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(REQUIRED + argv)


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="--train_dir is required"):
        parse_config(["--output_dir", "o", "--model_name_or_path", "m"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'.*learning_rate"):
        parse_config(REQUIRED + ["--config", str(bad)])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("max_steps: many\n")
    with pytest.raises(ConfigError, match="max_steps"):
        parse_config(REQUIRED + ["--config", str(wrong)])


def test_skip_from_is_checked_against_the_backbone():
    cfg = TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t", skip_from=8).validate()
    with pytest.raises(ConfigError, match="beyond the backbone's 6 layers"):
        cfg.validate_against_model(6, "bert")
    with pytest.raises(ConfigError, match="model_type"):
        TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t", skip_from=2,
                    model_type="roberta").validate().validate_against_model(6, "bert")


def test_global_batch_size_derives_the_per_process_size():
    cfg = TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t", global_batch_size=2048).validate()
    assert cfg.per_device_docs(8) == 256 and cfg.per_device_docs(1) == 2048
    with pytest.raises(ConfigError, match="not divisible by the 3 processes: use 2046 or 2049"):
        cfg.per_device_docs(3)
    assert TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t").per_device_docs(4) == 8


@pytest.mark.parametrize("text, match", [
    ("per_device_train_batch_size:\n", "'per_device_train_batch_size' has no value"),
    ("per_device_train_batch_size: 8.9\n", "expects int, got 8.9"),
    ("max_steps: true\n", "expects int"),
    ("learning_rate: [1\n", "line 2.*not valid YAML"),
    ("learning_rate: -1e-4\n", "--learning_rate must be >= 0"),
])
def test_recipe_mistakes_name_the_file_key_and_fix(tmp_path, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(REQUIRED + ["--config", str(recipe)])


@pytest.mark.parametrize("argv, match", [
    (["--per_device_train_batch_size", "8.9"], "expected a whole number"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
    (["--peak_tflops", "-1"], "--peak_tflops must be >= 0"),
    (["--dataloader_num_workers", "-2"], "--dataloader_num_workers must be >= 0"),
    (["--learning_rate", "-1"], "--learning_rate must be >= 0"),
])
def test_out_of_range_flags_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(REQUIRED + argv)
    assert parse_config(REQUIRED + ["--max_steps", "1e3"]).optim.max_steps == 1000  # a whole number in any notation


def test_sequence_length_is_checked_against_the_position_embeddings():
    cfg = TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t", skip_from=2,
                                 max_seq_length=4096).validate()
    with pytest.raises(ConfigError, match="--max_seq_length 4096 is longer than m can embed \\(512 positions\\)"):
        cfg.validate_against_model(6, "bert", 512)


def test_the_engine_rules_and_the_recipe_that_runs():
    """Under DeepSpeed: --max_nonfinite_skips refused; under ZeRO-3 the gradient cache refused and length
    groups turned off in the recipe itself (a copy: the caller's stays), so that what is recorded is what ran."""
    base = dict(output_dir="o", model_name_or_path="m", train_dir="t", skip_from=2)
    cfg = TrainConfig.from_flags(**base, length_bucket_width=8, pack_length=0).validate()
    assert cfg.for_engine(None) is cfg and cfg.for_engine(2) is cfg
    zero3 = cfg.for_engine(3)
    assert zero3.layout.length_bucket_width == 0 and cfg.layout.length_bucket_width == 8
    assert TrainConfig.from_flags(**base, length_bucket_width=8, pack_length=64).for_engine(3).layout.length_bucket_width == 8
    with pytest.raises(ConfigError, match="--max_nonfinite_skips is not available under DeepSpeed"):
        TrainConfig.from_flags(**base, max_nonfinite_skips=2).for_engine(1)
    with pytest.raises(ConfigError, match="--cache_chunk_size with ZeRO-3 is not supported"):
        TrainConfig.from_flags(**base, cache_chunk_size=4).for_engine(3)
    assert TrainConfig.from_flags(**base, cache_chunk_size=4).for_engine(2).compute.cache_chunk_size == 4
    with pytest.raises(ConfigError, match="--eval_data is not available under ZeRO-3"):
        TrainConfig.from_flags(**base, eval_data=["beir/scifact"]).for_engine(3)
    assert TrainConfig.from_flags(**base, eval_data=["beir/scifact"]).for_engine(2).evaluation.eval_data


def test_the_commands_are_installed_as_scripts():
    """Every command but training (launched as a file or with -m) is an installed script running its module's
    main; the installed wrapper runs."""
    import importlib
    from importlib.metadata import entry_points
    from pathlib import Path

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("coco_accel.")}
    commands = {f"coco-{name}": f"coco_accel.{name}:main" for name in
                ("preprocess", "experiment", "report", "checkpoint", "demo")}
    commands["coco-evaluate"] = "coco_accel.evaluation.__main__:main"  # python -m coco_accel.evaluation
    assert {name: ep.value for name, ep in scripts.items()} == commands
    for name, ep in scripts.items():
        assert ep.load() is importlib.import_module(ep.value.split(":")[0]).main
    run = subprocess.run([str(Path(sys.executable).parent / "coco-checkpoint"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "universal" in run.stdout


def test_a_fixed_set_of_values_is_checked_wherever_it_comes_from(tmp_path):
    """Literal-typed fields: the flag's choices, the YAML key and a TrainConfig built in code all refuse
    a value outside the set, naming the choices."""
    with pytest.raises(ConfigError, match=r"invalid choice: 'adam' \(choose from 'adamw', 'sgd'\)"):
        parse_config(REQUIRED + ["--optimizer", "adam"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_score: cosine\n")
    with pytest.raises(ConfigError, match="key 'eval_score' expects one of dot, cos, got 'cosine'"):
        parse_config(REQUIRED + ["--config", str(recipe)])
    recipe.write_text("eval_score: cos\n")
    assert parse_config(REQUIRED + ["--config", str(recipe)]).evaluation.eval_score == "cos"
    with pytest.raises(ConfigError, match="--head_init must be one of random, copy; got 'backbone'"):
        TrainConfig.from_flags(output_dir="o", model_name_or_path="m", train_dir="t", head_init="backbone").validate()


def test_the_recipe_is_in_sections_and_its_record_is_a_recipe(tmp_path):
    """Each flag lives in one section (cfg.optim.learning_rate); a YAML recipe may give flags at the top
    level or under their section, and one under the wrong section is refused naming its own; the run
    folder's train_config.json (cfg.sections()) read back as --config gives the same recipe."""
    from coco_accel.training.config import SECTIONS

    names = TrainConfig.field_names()
    assert len(names) == len(set(names)) == 57  # one flag per field, unique across sections
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  learning_rate: 2.0e-4\n  max_steps: 7\nlate_mlm: true\nlayout: {pack_length: 0}\n")
    cfg = parse_config(REQUIRED + ["--config", str(recipe), "--max_steps", "9"])
    assert (cfg.optim.learning_rate, cfg.optim.max_steps, cfg.model.late_mlm, cfg.layout.pack_length) == (2e-4, 9, True, 0)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  pack_length: 0\n")
    with pytest.raises(ConfigError, match="key 'pack_length' under 'optim' belongs to section 'layout'"):
        parse_config(REQUIRED + ["--config", str(wrong)])
    wrong.write_text("optim:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rat'. Did you mean 'learning_rate'"):
        parse_config(REQUIRED + ["--config", str(wrong)])

    recorded = tmp_path / "train_config.json"
    recorded.write_text(json.dumps(cfg.sections()))
    assert parse_config(["--config", str(recorded)]) == cfg
    assert TrainConfig.from_flags(**cfg.flags()) == cfg and cfg.replace(seed=1).job.seed == 1 and cfg.job.seed == 42
    help_text = subprocess.run([sys.executable, "coco_accel/train.py", "--help"], capture_output=True, text=True,
                               check=True).stdout
    titles = [title for _, title in SECTIONS.values()]
    assert [help_text.index(f"\n{t}:") for t in titles] == sorted(help_text.index(f"\n{t}:") for t in titles)


def test_the_shipped_recipes_state_a_global_batch_that_holds_on_any_process_count(tmp_path):
    """configs/coco_dr.yaml is the paper's 2048 documents per step on 1, 8 or 64 processes (the batch was
    per process, 8x the paper's on 64 GPUs); every training recipe states its global batch. A command-line
    --per_device_train_batch_size replaces a recipe's global batch; given together, the global one wins."""
    import yaml

    paper = parse_config(REQUIRED + ["--config", str(REPO / "configs" / "coco_dr.yaml")])
    assert {world: paper.per_device_docs(world) for world in (1, 8, 64)} == {1: 2048, 8: 256, 64: 32}
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        if recipe.name != "coco_corpora.yaml":  # the corpus list, not a training recipe
            assert yaml.safe_load(recipe.read_text()).get("global_batch_size"), recipe.name
    sweep = parse_config(REQUIRED + ["--config", str(REPO / "configs" / "coco_dr.yaml"),
                                     "--per_device_train_batch_size", "16"])
    assert sweep.per_device_docs(4) == 16 and sweep.data.global_batch_size == 0
    both = parse_config(REQUIRED + ["--per_device_train_batch_size", "8", "--global_batch_size", "64"])
    assert both.per_device_docs(4) == 16  # --global_batch_size, as its help says
