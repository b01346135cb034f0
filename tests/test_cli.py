import pytest

import scaleformer as sf
from scaleformer.cli import main


def test_generate_from_preset_prints_output(capsys):
    assert main(["generate", "--preset", "gpt-tiny", "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'Hi'" in out and "5 tokens in" in out


def test_generate_from_checkpoint_and_encoder_decoder(tmp_path, capsys):
    from scaleformer.data.tokenizer import ByteTokenizer

    sf.save(sf.build(sf.load_preset("mt-tiny")), tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "3"]) == 2  # no tokenizer: refused
    assert "tokenizer.json not found" in capsys.readouterr().err
    ByteTokenizer().save(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"model: checkpoint {tmp_path}" in out and " tokens in " in out
    assert main(["presets"]) == 0
    assert "gpt-tiny" in capsys.readouterr().out


def test_bad_input_gives_an_error_and_exit_code_2(capsys):
    assert main(["generate", "--preset", "gpt-tny"]) == 2
    assert "did you mean `gpt-tiny`" in capsys.readouterr().err
    assert main(["generate", "--preset", "bert-tiny"]) == 2
    assert main(["generate", "--checkpoint", "/nonexistent"]) == 2


def test_generate_decodes_in_the_decoding_layout_unless_told_otherwise(capsys, monkeypatch):
    import contextlib

    import scaleformer.commands as cli

    entered = []
    real = cli.decoding_layout

    @contextlib.contextmanager
    def recording(model):
        with real(model) as count:
            entered.append(count)
            yield count

    monkeypatch.setattr(cli, "decoding_layout", recording)
    outputs = []
    for extra in ([], ["--standard-layout"]):
        assert main(["generate", "--preset", "retnet-mini", "--prompt", "Hi", "--max-new-tokens", "8", *extra]) == 0
        outputs.append(capsys.readouterr().out.split("output: ")[1].split("\n")[0])
    assert len(entered) == 1 and entered[0] > 0  # only the first run, and it laid weights out
    assert outputs[0] == outputs[1]  # greedy text: the same tokens either way


def test_generate_from_retnet_preset(capsys):
    assert main(["generate", "--preset", "retnet-tiny", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert "model: preset retnet-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["gret-tiny", "diff-tiny", "bitnet-tiny", "yoco-tiny", "tnl-tiny", "s2-tiny"])
def test_generate_from_the_newer_presets_streams(preset, capsys):
    assert main(["generate", "--preset", preset, "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"model: preset {preset}" in out and "4 tokens in" in out


def test_presets_lists_every_preset_with_its_family_mixers_size_and_parameters(capsys):
    """No blank rows: every preset (RetNet, gated retention, YOCO, S2 and TNL included) shows its family, mixers,
    width, depth and a parameter count equal to the built model's."""
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[4:] if line.strip()}
    assert sorted(rows) == sorted(sf.list_presets())
    assert all(len(row) == 6 for row in rows.values()), rows
    assert rows["gret-tiny"][1:5] == ["retnet", "retention(gated)×2", "64", "2"]
    assert rows["yoco-tiny"][2] == "retention(gated)×2+cross_decoder×2" and rows["s2-tiny"][2] == "s2×1+attention×1"
    model = sf.build(sf.load_preset("tnl-tiny"))
    assert rows["tnl-tiny"][5] == f"{sum(p.numel() for p in model.parameters()) / 1e3:.1f}k"


@pytest.mark.parametrize("argv, code, says", [(["--help"], 0, "train"), (["train", "--help"], 0, "--steps"),
                                             (["train", "--steps", "abc"], 2, "invalid int value: 'abc'"),
                                             (["trian"], 2, "invalid choice: 'trian'"), (["bench"], 2, "required")])
def test_help_and_flag_errors_answer_without_importing_torch(argv, code, says):
    """Importing torch takes seconds (tens of them on a busy machine): --help and a mistyped flag do not wait."""
    import subprocess
    import sys

    script = ("import sys\nfrom scaleformer.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
              "print('torch' in sys.modules, code, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert result.stderr.splitlines()[-1] == f"False {code}", result.stderr[-2000:]
    assert says in result.stdout + result.stderr
