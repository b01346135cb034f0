import json
import math

import torch

import scaleformer as sf

from scaleformer.bench.common import peak_memory, time_call
from scaleformer.bench.common import log_log_slope
from scaleformer.cli import main


def test_peak_memory_counts_live_tensor_bytes():
    def allocate():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB while a is alive
        del a, b
        c = torch.empty(1 << 18)  # 1 MiB after both are freed
        return c

    assert peak_memory(allocate, device=torch.device("cpu")) == 6 * 2**20


def test_time_call_returns_a_median_of_positive_times():
    calls = []
    seconds = time_call(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and 0 <= seconds < 0.1


def test_slope_of_power_laws():
    xs = [1024.0, 2048.0, 4096.0]
    assert math.isclose(log_log_slope(xs, [x**2 for x in xs]), 2.0)
    assert math.isclose(log_log_slope(xs, [3 * x for x in xs]), 1.0)


def test_retention_benchmark_cli_writes_consistent_figures(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "retention", "--lengths", "64", "128", "--contexts", "32", "64", "--repeats", "1",
                 "--heads", "2", "--head-dim", "8", "--chunk-size", "16", "--presets", "retnet-tiny", "gret-tiny",
                 "--model-length", "48", "--op-presets", "retnet-mini", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["T"] for r in data["training"]] == [64, 128]
    # table (c): whole presets, each at its own chunk size, both forms timed, and their retention op alone
    assert [(r["preset"], r["chunk_size"], r["T"]) for r in data["models"]] == [("retnet-tiny", 16, 48),
                                                                                ("gret-tiny", 16, 48)]
    for r in data["models"]:
        assert 0 < r["parallel_s"] < 10 and 0 < r["chunkwise_s"] < 10 and 0 < r["op_chunkwise_s"] < 10
        assert abs(r["op_parallel_over_chunkwise"] - r["op_parallel_s"] / r["op_chunkwise_s"]) < 1e-9
    # table (d): the op alone at retnet-mini's shape (2 heads of 64 key dims, 128 value dims + the ones column)
    (op,) = data["ops"]
    assert (op["preset"], op["heads"], op["key_dim"], op["value_dim"], op["chunk_size"]) == ("retnet-mini", 2, 64,
                                                                                             129, 64)
    assert 0 < op["op_parallel_s"] < 10 and 0 < op["op_chunkwise_s"] < 10
    for row in data["training"]:
        assert all(0 < row[key] < 10 for key in ("parallel_s", "chunkwise_s", "sdpa_s"))  # measured, not zero
    # Memory is measured, not assumed: doubling T quadruples the parallel form's T x T decayed scores, while
    # the chunkwise form's (C x C per chunk) only doubles.
    short, long = data["training"]
    assert long["parallel_peak_mb"] > 3 * short["parallel_peak_mb"]
    assert 1.5 * short["chunkwise_peak_mb"] < long["chunkwise_peak_mb"] < 2.5 * short["chunkwise_peak_mb"]
    decoding = data["decoding"]
    # RetNet's cache is its fixed-size states: 6 layers × (1 × 2 heads × 256 × (432 + 1)) fp32 values.
    assert all(r["retnet_cache_mb"] == 6 * 2 * 256 * 433 * 4 / 2**20 for r in decoding)
    # The decoder's KV cache grows with the context: 6 layers × K and V × 8 heads × 64 × (context + steps).
    assert decoding[1]["decoder_cache_mb"] > decoding[0]["decoder_cache_mb"]
    assert "(b) per-token decoding" in capsys.readouterr().out


def test_retention_benchmark_times_gated_decays(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["bench", "retention", "--decay", "token", "--lengths", "64", "--contexts", "32", "--repeats", "1",
                 "--heads", "2", "--head-dim", "8", "--chunk-size", "16", "--presets", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["decay"] == "token"
    assert all(0 < data["training"][0][key] < 10 for key in ("parallel_s", "chunkwise_s", "sdpa_s"))
    assert "decay per token" in capsys.readouterr().out


def test_bitlinear_benchmark_reports_memory_and_time(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "bitlinear", "--shapes", "64x128", "--tokens", "1", "3", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["layer"]) for r in rows[:4]] == [(1, "fp32 linear"), (1, "bf16 linear"),
                                                          (1, "BitLinear (latent fp32)"), (1, "packed BitLinear")]
    memory = {r["layer"]: r["weight_mb"] for r in rows}
    assert memory["fp32 linear"] == 64 * 128 * 4 / 2**20 and memory["bf16 linear"] == memory["fp32 linear"] / 2
    assert memory["packed BitLinear"] == (64 * 128 // 4 + 4) / 2**20  # 2 bits per weight and one fp32 scale
    assert all(r["ms"] > 0 for r in rows) and len(rows) == 8


def test_dilated_benchmark_cli_writes_consistent_figures(tmp_path):
    out = tmp_path / "d.json"
    assert main(["bench", "dilated", "--lengths", "256", "512", "--segments", "64", "128", "--rates", "1", "2",
                 "--heads", "2", "--head-dim", "8", "--repeats", "1", "--worlds", "2", "4", "--comm-length", "256",
                 "--comm-segments", "64", "256", "--comm-rates", "1", "4", "--weak-tokens-per-rank", "128",
                 "--weak-segments", "64", "256", "--weak-rates", "1", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["T"] for r in data["attention"]] == [256, 512]
    assert all(0 < r["dense_s"] < 10 and 0 < r["dilated_s"] < 10 for r in data["attention"])
    short, long = data["attention"]  # dilated attention's memory is linear in T: twice the tokens, twice the bytes
    assert 1.5 * short["dilated_peak_mb"] < long["dilated_peak_mb"] < 2.5 * short["dilated_peak_mb"]
    strong = {r["world"]: r for r in data["communication"]}
    # Pattern (256, 4) spans both ranks: each gathers 2 ranks × ceil(128/4) rows × k,v × 2 heads × 8 dims × fp32,
    # in the forward and again in the backward; it sends its own rows three times (gather, re-gather, scatter).
    rows = 2 * 2 * 32 * 8 * 4
    assert strong[2]["gathered_mb"] == 2 * 2 * rows / 2**20
    assert strong[2]["sent_mb"] == 3 * rows / 2**20
    # 4 ranks, T = 256: the segment spans all 4; each rank holds 64 tokens, so 16 rows of its own, sent to 3
    # peers; the gathered buffer is the same w/r = 64 rows per head as with 2 ranks.
    assert strong[4]["gathered_mb"] == strong[2]["gathered_mb"]
    assert strong[4]["sent_mb"] == 3 * 3 * (rows // 2) / 2**20
    # Weak scaling (128 tokens per rank, T = 256 and 512): w = 256 always spans 2 ranks, so every byte count
    # is the same at 2 and 4 ranks.
    weak = data["communication_weak_scaling"]
    assert [r["T"] for r in weak] == [256, 512]
    assert weak[0]["sent_mb"] == weak[1]["sent_mb"] == 3 * rows / 2**20
    assert weak[0]["gathered_mb"] == weak[1]["gathered_mb"] == 2 * 2 * rows / 2**20


def test_moe_benchmark_cli_writes_consistent_figures(tmp_path):
    out = tmp_path / "m.json"
    assert main(["bench", "moe", "--tokens", "256", "--experts", "4", "16", "--embed-dim", "16", "--ffn-dim", "32",
                 "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["experts"] for r in rows] == [4, 16]
    for r in rows:
        assert 0 < r["index_s"] < 10 and 0 < r["one_hot_s"] < 10  # measured, not zero
        # The one-hot tensors alone are 2 · N · E · S fp32 values (S = N / E): 2 · 256² · 4 bytes.
        assert r["one_hot_peak_mb"] - r["index_peak_mb"] >= 2 * 256 * 256 * 4 / 2**20 * 0.9


def run_torchscale_benchmark(tmp_path, *flags: str) -> dict:
    """``scaleformer bench torchscale`` at a tiny size (skipped without torchscale); its JSON."""
    import pytest

    from scaleformer.interop.torchscale import import_torchscale

    try:
        import_torchscale()
    except ImportError:
        pytest.skip("torchscale not installed")
    out = tmp_path / "t.json"
    assert main(["bench", "torchscale", "--lengths", "128", "--chunk-sizes", "32", "--contexts", "16",
                 "--disagreement-length", "96", "--embed-dim", "64", "--layers", "1", "--vocab", "128",
                 "--repeats", "1", *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_torchscale_benchmark_cli_writes_consistent_figures(tmp_path):
    data = run_torchscale_benchmark(tmp_path, "--no-compile")  # compiled: tests/test_compiled_decoding.py
    cells = {(r["model"], r["library"]) for r in data["training"]}
    assert cells == {(m, lib) for m in ("decoder", "retnet-parallel", "retnet-chunk32", "retention-op-chunk32")
                     for lib in ("torchscale", "scaleformer")}
    assert {(r["model"], r["library"]) for r in data["decoding"]} == {
        (m, lib) for m in ("decoder", "retnet") for lib in ("torchscale", "scaleformer", "scaleformer+layout")}
    rows = {(r["dtype"], r["library"]): r for r in data["disagreement"]}
    # Ours: rounding only (float64 makes it vanish); the converted model reproduces TorchScale's parallel form.
    assert rows[("float64", "scaleformer (normalizer=torchscale)")]["worst"] < 1e-10
    assert rows[("float32", "scaleformer (normalizer=torchscale)")]["parallel_vs_torchscale_parallel"] < 1e-4
    # TorchScale's chunkwise form computes another function than its parallel form, in any precision.
    assert rows[("float64", "torchscale")]["parallel_vs_chunkwise"] > 1e-3


def test_torchscale_benchmark_without_torchscale_says_skipped(monkeypatch, capsys):
    import scaleformer.interop.torchscale as interop

    def missing():
        raise ImportError("No module named 'torchscale'")

    monkeypatch.setattr(interop, "import_torchscale", missing)
    assert main(["bench", "torchscale", "--lengths", "64"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_attention_benchmark_reports_the_cache_each_variant_holds(tmp_path):
    out = tmp_path / "a.json"
    assert main(["bench", "attention", "--context", "40", "--steps", "3", "--embed-dim", "32", "--heads", "4",
                 "--layers", "2", "--kv-heads", "2", "--window", "8", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    full = 2 * 2 * 43 * 32 * 4 / 2**20  # layers × (K, V) × tokens × width × fp32 bytes
    assert math.isclose(rows["full"]["cache_mb_after_decoding"], full)
    assert math.isclose(rows["gqa-2"]["cache_ratio"], 0.5) and math.isclose(rows["mqa"]["cache_ratio"], 0.25)
    assert math.isclose(rows["window-8"]["cache_ratio"], 7 / 43)  # the window's 7 previous tokens are held
    assert all(r["step_ms"] > 0 for r in rows.values()) and data["machine"]["matmul_gflops"] > 0


def test_yoco_benchmark_caches_one_layer_against_every_layer(tmp_path):
    out = tmp_path / "y.json"
    assert main(["bench", "yoco", "--contexts", "64", "192", "--steps", "1", "--repeats", "1", "--embed-dim", "32",
                 "--layers", "4", "--heads", "2", "--kv-heads", "1", "--ffn-dim", "48", "--window", "16",
                 "--prefill", "32", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    cache = {(r["context"], r["model"]): r["cache_mb"] * 2**20 for r in payload["decoding"]}
    transformer, retnet, gret, swa = (name for name in dict.fromkeys(r["model"] for r in payload["decoding"]))
    per_token = 16 * 2 * 4  # one key/value head of width 16, keys and values, fp32
    # The caches after filling to the context and 2 steps: the Transformer grows by 4 layers per token, YOCO by
    # one, RetNet not at all; the sliding-window layers hold 15 slots whatever the context.
    assert cache[(192, transformer)] - cache[(64, transformer)] == 128 * 4 * per_token
    assert cache[(192, gret)] - cache[(64, gret)] == 128 * per_token == cache[(192, swa)] - cache[(64, swa)]
    assert cache[(192, retnet)] == cache[(64, retnet)]
    assert cache[(64, swa)] - cache[(64, gret)] == 2 * 15 * 2 * per_token - 2 * (2 * 16 * 16 * 4)
    assert all(r["step_ms"] > 0 for r in payload["decoding"]) and len(payload["prefill"]) == 6


def test_s2_benchmark_reports_times_the_kept_fraction_and_cache_bytes(tmp_path):
    out = tmp_path / "s.json"
    assert main(["bench", "s2", "--lengths", "64", "128", "--heads", "2", "--head-dim", "8", "--block", "8",
                 "--local-blocks", "2", "--vert-stride", "4", "--segments", "32", "64", "--rates", "1", "2",
                 "--train-lengths", "64", "--cache-heads", "2/2", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["forward"]
    assert [r["length"] for r in rows] == [64, 128]
    assert all(r["s2_s"] > 0 and r["dense_s"] > 0 and r["dilated_s"] > 0 for r in rows)
    # 64 positions, blocks of 8: each query reads its own block and the one before (2 local blocks) plus the
    # strided blocks; the fraction is counted exactly and shrinks as the context grows
    from scaleformer.bench.s2 import kept_fraction
    from scaleformer.ops.s2 import S2Layout
    layout = S2Layout(block=8, local_blocks=2, vert_stride=4)
    blocks = torch.arange(64) // 8
    pairs = sum(bool(layout.blocks(2, blocks[i], blocks[j], True)[h]) for h in range(2) for i in range(64)
                for j in range(i + 1))
    assert rows[0]["kept"] == kept_fraction(layout, 2, 64) == pairs / (2 * 64 * 65 / 2)
    assert rows[1]["kept"] < rows[0]["kept"] and payload["slope_against_pairs"] is not None
    train = payload["train"][0]
    assert train["s2_s"] > 0 and train["s2_peak_mb"] > 0 and train["dense_peak_mb"] > 0
    # After 129 tokens the next query is in block 16: each of the 2 key/value heads keeps its 4 strided
    # blocks below 15 (8 slots each) and the local blocks 15 and 16 (8 + 1 slots): 41 slots of fp32 keys and
    # values of 8, plus an 8-byte position, against 129 slots in a full cache.
    cache = payload["cache"][1]
    assert cache["length"] == 129
    assert cache["held_mb"] * 2**20 == 41 * 2 * (2 * 8 * 4 + 8) and cache["full_mb"] * 2**20 == 129 * 2 * 2 * 8 * 4


def test_icl_benchmark_groups_to_fit_and_stops_conventional_past_the_context(tmp_path):
    out = tmp_path / "icl.json"
    assert main(["bench", "icl", "--demos", "2", "4", "8", "--context", "40", "--demo-length", "8",
                 "--test-length", "4", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # groups: ⌈N·8 / (40 − 4)⌉ — each group and the test after it fit the context
    assert [r["groups"] for r in rows] == [1, 1, 2]
    assert [r["conventional_s"] is None for r in rows] == [False, False, True]  # 8·8 + 4 > 40
    assert all(r["structured_s"] > 0 and r["structured_peak_mb"] > 0 for r in rows)


def test_icl_benchmark_context_defaults_to_the_models_positions(tmp_path):
    # gpt-tiny's learned table holds 1024 positions: a longer conventional prompt cannot run at all
    out = tmp_path / "icl.json"
    assert main(["bench", "icl", "--model-options", "--demos", "2", "--demo-length", "8", "--test-length", "4",
                 "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["context"] == 1024
    assert main(["bench", "icl", "--model-options", "max_positions=48", "--demos", "2", "8",
                 "--demo-length", "8", "--test-length", "4", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["settings"]["context"] == 48
    assert [r["groups"] for r in payload["rows"]] == [1, 2]  # ⌈64 / 44⌉


def test_mixers_benchmark_times_training_and_decoding_with_exact_state_sizes(tmp_path):
    out = tmp_path / "mixers.json"
    assert main(["bench", "mixers", "--lengths", "32", "64", "--context", "40", "--steps", "2", "--embed-dim", "32",
                 "--heads", "2", "--layers", "2", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["length"] for r in payload["training"]] == [32, 64]
    assert all(r[f"{m}_s"] > 0 for r in payload["training"] for m in ("attention", "momentum", "lightning"))
    state = {r["mixer"]: r["state_mb"] * 2**20 for r in payload["decoding"]}
    # after 40 + 3 tokens (the warm-up step and two timed ones): attention holds keys and values of 43 slots
    # per layer; momentum adds its running sum (2 heads × 16); Lightning holds a (16 × 16) state per head
    per_slot = 2 * 32 * 4
    assert state["attention"] == 2 * 43 * per_slot
    assert state["momentum"] == state["attention"] + 2 * 32 * 4
    assert state["lightning"] == 2 * 2 * 16 * 16 * 4
    # Gated DeltaNet: per layer a (16 × 16) state per head and its convolutions' last 3 inputs of q, k, v
    assert state["gated_deltanet"] == 2 * (2 * 16 * 16 + 3 * 96) * 4
    # Mamba-2 (4 layers of expand 2: 2 heads of 32, state 64): a (64 × 32) state per head and the
    # convolution's last 3 inputs of x, B, C (64 + 2 × 64 channels)
    assert state["mamba2"] == 4 * (2 * 64 * 32 + 3 * 192) * 4
    # DIFF V2 and the gated attention with sinks cache the same keys and values as attention; Samba's one
    # window layer (window 512 > 43) holds its 43 slots, its one Mamba-2 layer a Mamba-2 layer's state
    assert state["diff_attention_v2"] == state["gate_sinks"] == state["attention"]
    assert state["samba"] == 43 * per_slot + (2 * 64 * 32 + 3 * 192) * 4
    # activation memory: counted per length and growing with it (attention's about twice for twice the tokens;
    # Mamba-2's chunk of 64 holds per-chunk tensors of one size at both lengths)
    for mixer in state:
        small, large = (r[f"{mixer}_saved_mb"] for r in payload["training"])
        assert 0 < small < large, (mixer, small, large)
    small, large = (r["attention_saved_mb"] for r in payload["training"])
    assert 1.5 < large / small < 2.6
    assert set(payload["memory_slopes"]) == set(state)


def test_train_benchmark_counts_every_matrix_product_of_a_step(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--presets", "gpt-tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "0",
                 "--steps", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    tokens, layers, heads, head_dim = 2 * 16, 2, 4, 16
    # gpt-tiny's products: its Linear weights (65,536) and the tied 512 × 64 output head, 2 + 4 FLOPs per
    # weight and token forward + backward; and attention, 4·B·H·T²·d forward, 2.5× that backward, per layer.
    linear = 6 * tokens * (65_536 + 512 * 64)
    attention = layers * 3.5 * 4 * 2 * heads * 16 * 16 * head_dim
    assert row["gflop_per_step"] * 1e9 == linear + attention
    assert row["tokens_per_s"] == tokens / row["step_s"]
    assert abs(row["mfu"] - row["achieved_gflops"] / row["matmul_gflops"]) < 1e-12


def test_train_benchmark_in_bf16_with_overrides(tmp_path, capsys):
    """--precision bfloat16 counts the same products (autocast changes dtypes, not shapes) against the bf16
    matmul rate; --set changes preset fields; a bad --set is one line."""
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--presets", "gpt-tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "0",
                 "--steps", "1", "--precision", "bfloat16", "--set", "layers=1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    row = payload["rows"][0]
    assert payload["settings"]["precision"] == "bfloat16"
    tokens, heads, head_dim = 2 * 16, 4, 16
    linear = 6 * tokens * (65_536 // 2 + 512 * 64)  # one layer of the two
    assert row["gflop_per_step"] * 1e9 == linear + 3.5 * 4 * 2 * heads * 16 * 16 * head_dim
    assert abs(row["mfu"] - row["achieved_gflops"] / row["matmul_gflops"]) < 1e-12
    capsys.readouterr()
    assert main(["bench", "train", "--presets", "gpt-tiny", "--set", "layers"]) != 0
    assert "model option 'layers' is not KEY=VALUE" in capsys.readouterr().err


def test_layout_benchmark_cli_writes_consistent_figures(tmp_path):
    out = tmp_path / "layout.json"
    assert main(["bench", "layout", "--shapes", "48x16", "16x48", "--rows", "1", "4", "--megabytes", "0.05",
                 "--repeats", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = {(c["out"], c["in"], c["rows"]): c for c in data["cells"]}
    assert set(cells) == {(o, i, r) for o, i in ((48, 16), (16, 48)) for r in (1, 4)}
    import torch

    from scaleformer.runtime import decoding_layout

    for (o, i, _), c in cells.items():
        assert c["row_major_us"] > 0 and c["column_major_us"] > 0
        assert abs(c["row_over_column"] - c["row_major_us"] / c["column_major_us"]) < 1e-9
        with decoding_layout(torch.nn.Linear(i, o)) as count:  # the column states what the layout really does
            assert c["laid_out_by_decoding_layout"] == (count == 1)
    assert [c["laid_out_by_decoding_layout"] for c in cells.values()] == [True, True, False, False]


def test_layout_benchmark_refuses_a_malformed_shape(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "layout", "--shapes", "864by512"])
    assert "OUTxIN" in capsys.readouterr().err


def test_bench_delta_times_every_form_by_length(tmp_path):
    out = tmp_path / "delta.json"
    assert main(["bench", "delta", "--lengths", "32", "64", "--heads", "2", "--head-dim", "8", "--chunk-size", "16",
                 "--recurrent-max", "32", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    first, second = payload["rows"]
    assert {"chunkwise_s", "sdpa causal_s", "recurrent_s"} <= set(first) and "recurrent_s" not in second
    for row in payload["rows"]:
        for key in (k for k in row if k.endswith("_s") and not k.endswith("_iqr_s")):
            low, high = row[key.replace("_s", "_iqr_s")]
            assert 0 < low <= row[key] <= high and row[key.replace("_s", "_peak_mb")] > 0
    assert payload["slopes"]["recurrent"] is None and payload["slopes"]["chunkwise"]["low"] <= payload["slopes"]["chunkwise"]["high"]


def test_generate_benchmark_times_the_engine_prefixes_speculation_and_the_server(tmp_path):
    from scaleformer.data.tokenizer import ByteTokenizer

    for name, layers in (("target", 2), ("draft", 1)):
        torch.manual_seed(layers)
        sf.save(sf.build(sf.retnet(vocab_size=259, embed_dim=16, value_dim=16, layers=layers, heads=2, ffn_dim=32)),
                tmp_path / name)
        ByteTokenizer().save(tmp_path / name)
    out = tmp_path / "generate.json"
    assert main(["bench", "generate", "--embed-dim", "16", "--layers", "4", "--heads", "4", "--vocab-size", "300",
                 "--batches", "1", "3", "--prompt", "5", "--steps", "2", "--rounds", "5", "--prompts", "20", "40",
                 "--prefix-block", "8", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                 "--new-tokens", "6", "--requests", "6", "--concurrency", "3", "--max-tokens", "4", "--no-compile",
                 "--json", str(out)]) == 0  # the compiled steps' table: tests/test_compiled_decoding.py
    data = json.loads(out.read_text())
    assert {(r["model"], r["batch"]) for r in data["throughput"]} == {
        (m, b) for m in ("gpt", "retnet", "gdn", "gdn-hybrid") for b in (1, 3)}
    assert all(r["tokens_per_s_q25"] <= r["tokens_per_s"] <= r["tokens_per_s_q75"] for r in data["throughput"])
    assert len(data["first_token"]) == 4 * 2 * 3 and all(r["ttft_ms"] > 0 for r in data["first_token"])
    assert [r["temperature"] for r in data["speculative"]] == [0.0, 1.0]
    assert all(0 <= r["acceptance"] <= 1 and r["tokens_per_target_call"] >= 1 for r in data["speculative"])
    assert [(r["model"], r["completed"]) for r in data["server"]] == [("gpt", 6), ("gdn-hybrid", 6)]
    assert all(r["latency_p50_s"] <= r["latency_p99_s"] for r in data["server"])
