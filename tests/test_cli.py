"""The command line takes its flags, defaults and help from the config dataclasses, and any command takes
--config FILE (JSON or YAML)."""

import json

import pytest

from nanoseek.cli import build_parser, config_from, main, parse_args
from nanoseek.demo import DemoConfig, _rl_schedule
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import PretrainConfig


def parse(*argv):
    return parse_args(list(argv))


def test_every_flag_has_help_and_help_shows_defaults():
    _, commands = build_parser()
    for name, p in commands.items():
        for action in p._actions:
            assert action.help, f"nanoseek {name} {action.option_strings}: no help line"
        text = p.format_help()
        if name == "grpo":
            assert "(default: 0.0001)" in text and "(default: 0.7)" in text and "(default: dapo)" in text


def test_defaults_come_from_the_dataclasses_and_grpo_uses_the_demos_settings():
    args = parse("pretrain", "--out", "o")
    assert config_from(PretrainConfig, args) == PretrainConfig()
    assert config_from(TrainConfig, args) == TrainConfig()
    args = parse("grpo", "--init", "i", "--out", "o")
    assert config_from(GRPOConfig, args) == GRPOConfig()
    train = config_from(TrainConfig, args)
    assert train == TrainConfig(**GRPO_TRAIN_DEFAULTS)
    demo = _rl_schedule(DemoConfig(), steps=train.steps)
    assert (train.lr, train.warmup, train.min_lr_ratio, train.weight_decay) == (
        demo.lr,
        demo.warmup,
        demo.min_lr_ratio,
        demo.weight_decay,
    )
    args = parse(
        "pretrain",
        "--out",
        "o",
        "--task",
        "addition@2",
        "--task",
        "countdown",
        "--no-doc-mask",
        "--alpha",
        "0.5",
        "--betas",
        "0.8",
        "0.9",
    )
    pc, tc = config_from(PretrainConfig, args), config_from(TrainConfig, args)
    assert pc.tasks == ("addition@2", "countdown") and not pc.doc_mask and pc.balance_alpha == 0.5
    assert tc.betas == (0.8, 0.9)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_sets_flags_and_the_command_line_wins(tmp_path, suffix):
    values = {
        "init": "ckpt",
        "out": "runs/x",
        "group-size": 4,
        "lr": 2e-4,
        "dynamic_sampling": True,
        "loss_type": "grpo",
    }
    f = tmp_path / f"c{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps(values))
    else:
        f.write_text(
            "".join(f"{k}: {v if not isinstance(v, bool) else str(v).lower()}\n" for k, v in values.items())
        )
    args = parse_args(["grpo", "--config", str(f), "--lr", "3e-4"])
    cfg, train = config_from(GRPOConfig, args), config_from(TrainConfig, args)
    assert args.init == "ckpt" and args.out == "runs/x"
    assert cfg.group_size == 4 and cfg.dynamic_sampling and cfg.loss_type == "grpo"
    assert train.lr == 3e-4  # the command line wins over the file


@pytest.mark.parametrize(
    "content,why",
    [
        ('{"frobnicate": 1}', "frobnicate"),
        ('{"lr": "fast"}', "--lr"),
        ('{"schedule": "linear"}', "--schedule"),
        ("[1, 2]", "mapping"),
        ("{not json", "not valid JSON"),
        ('{"dense": "yes"}', "--dense"),
        ('{"doc_mask": false, "steps": 3.5}', "--steps"),
    ],
)
def test_bad_config_files_are_refused_naming_the_key(tmp_path, capsys, content, why):
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(f), "--out", "o"])
    assert e.value.code == 2
    assert why in capsys.readouterr().err


def test_a_config_file_may_hold_required_flags_and_switches(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out: runs/p\ndoc_mask: false\ntask: [addition@2]\n")
    args = parse_args(["pretrain", "--config", str(f)])
    pc = config_from(PretrainConfig, args)
    assert args.out == "runs/p" and not pc.doc_mask and pc.tasks == ("addition@2",)
