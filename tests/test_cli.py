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

    import scaleformer.cli as cli

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
