"""Hugging Face folders in and out: load_hf_weights, export_hf, the export CLI and initial_load_path.

Tiny random fp32 models on the CPU; nothing is downloaded.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from launcher import REPO  # noqa: E402
from test_hf_parity import TINY, _hf_model, _randomize  # noqa: E402
from test_train import tiny  # noqa: E402
from torchtrain.config import load_config  # noqa: E402
from torchtrain.data import load_tokenizer  # noqa: E402
from torchtrain.export import main as export_main  # noqa: E402
from torchtrain.hf_checkpoint import export_hf, hf_weight_files, load_hf_weights  # noqa: E402
from torchtrain.models import ModelArgs, RopeScaling, Transformer, get_model_args, hf_config  # noqa: E402
from torchtrain.models.hf import model_args_from_hf_config  # noqa: E402

ATOL = 1e-5
GQA = TINY  # 4 query heads, 2 key/value heads
QWEN2 = dataclasses.replace(TINY, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6)
QWEN3 = dataclasses.replace(TINY, qk_norm=True, explicit_head_dim=32, rope_theta=1e6, norm_eps=1e-6)  # heads 32 wide
MISTRAL = dataclasses.replace(TINY, sliding_window=8)  # fewer keys than the tests' 24 tokens
# Llama-3.2's kind: tied embeddings with Llama-3.1's RoPE scaling
LLAMA32 = dataclasses.replace(TINY, tie_embeddings=True, rope_theta=500000.0, rope_scaling=RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32))
# (args, family) of the families and variants every import and export test covers
FAMILIES = {
    "llama_gqa": (GQA, "llama"),
    "llama3.2_tied_rope_scaling": (LLAMA32, "llama"),
    "qwen2_bias": (QWEN2, "qwen2"),
    "qwen3_head_dim": (QWEN3, "qwen3"),
    "qwen3_tied": (dataclasses.replace(QWEN3, explicit_head_dim=0, tie_embeddings=True), "qwen3"),
    "mistral_window": (MISTRAL, "mistral"),
}


def _ours(args: ModelArgs, seed: int = 7) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model.eval()


def _tokens(args: ModelArgs) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("args,family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_load_sharded_save_pretrained(tmp_path, args, family):
    hf_model = _hf_model(args, family)
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert model_args_from_hf_config(json.loads((tmp_path / "config.json").read_text())) == args
    model = _ours(args)
    load_hf_weights(model, tmp_path, args)
    tokens = _tokens(args)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=ATOL, rtol=0)


def test_load_opens_only_the_shards_it_needs(tmp_path):
    hf_model = _hf_model(GQA, "llama")
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=40_000)
    files = hf_weight_files(tmp_path)
    model = _ours(GQA)
    del model.layers["1"]  # what a pipeline rank holding block 0 and the ends has
    needed = {files[k] for k in files if not k.startswith("model.layers.1.")}
    unneeded = set(files.values()) - needed
    assert unneeded, "the test needs a shard holding only block 1"
    for name in unneeded:
        (tmp_path / name).write_bytes(b"not a safetensors file")  # opening it would fail
    load_hf_weights(model, tmp_path, GQA)
    torch.testing.assert_close(model.layers["0"].attention.wk.weight,
                               hf_model.model.layers[0].self_attn.k_proj.weight, atol=0, rtol=0)


@pytest.mark.parametrize("args,family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_export_loads_in_transformers(tmp_path, args, family):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    model = _ours(args)
    _randomize(model)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<|eos|>", "<|bos|>"]))
    tok.save(str(tmp_path / "tok.json"))

    out = tmp_path / "hf"
    export_hf(model.state_dict(), args, out, family, tokenizer_path=tmp_path / "tok.json", max_shard_bytes=40_000)
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] and config["model_type"] == family and config["torch_dtype"] == "float32"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == hf_config(args, family)["architectures"][0]
    tokens = _tokens(args)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=ATOL, rtol=0)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox, hello"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text).ids and hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|eos|>" and config["eos_token_id"] == tok.token_to_id("<|eos|>")

    # And back: the exported folder loads into our model unchanged.
    back = _ours(args, seed=99)
    load_hf_weights(back, out, args)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, atol=0, rtol=0)


def _save(folder: Path, hf_sd: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in hf_sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _assert_same(model: Transformer, reference: Transformer) -> None:
    got = model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)


def _assert_export_equals(tmp_path: Path, ref: Transformer, args: ModelArgs, family: str, hf_sd: dict) -> None:
    """``export_hf`` as ``family`` writes exactly the hand-built ``hf_sd`` and a config.json giving ``args`` back."""
    from safetensors.torch import load_file

    out = export_hf(ref.state_dict(), args, tmp_path / f"export_{family}", family, max_shard_bytes=30_000)
    files = hf_weight_files(out)
    assert len(set(files.values())) >= 2 and set(files) == set(hf_sd)
    written = {k: v for name in set(files.values()) for k, v in load_file(out / name).items()}
    for key, value in hf_sd.items():
        torch.testing.assert_close(written[key], value, atol=0, rtol=0, msg=key)
    assert model_args_from_hf_config(json.loads((out / "config.json").read_text())) == args


def _assert_fsdp_tp_import_equals(folder: Path, args: ModelArgs, ref: Transformer, monkeypatch) -> None:
    """Imported under FSDP 2 x TP 2 (each of the 4 ranks in turn, in this process, over a fake process group),
    every rank's local shards are its cut of ``ref``'s tensors; a packed tensor stacking q, k and v rows (Qwen 1)
    is read in slices too, one interleaving them per group (InternLM2) whole."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtrain import hf_checkpoint
    from torchtrain.parallel.fsdp import apply_fsdp
    from torchtrain.parallel.tp import apply_tp

    reads = []
    read_slice = hf_checkpoint._read_slice

    def counting(f, key, index):
        value = read_slice(f, key, index)
        reads.append((key, value.numel(), math.prod(f.get_slice(key).get_shape())))
        return value

    monkeypatch.setattr(hf_checkpoint, "_read_slice", counting)
    whole = ref.state_dict()
    for rank in range(4):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
        try:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
            with torch.device("meta"):
                model = Transformer(args)
            apply_tp(model, mesh["tp"])
            apply_fsdp(model, mesh["dp_shard"], torch.float32, "default", False, False)
            model.to_empty(device="cpu")
            load_hf_weights(model, folder, args)
            for name, param in model.named_parameters():
                assert isinstance(param, DTensor), name
                cut = distribute_tensor(whole[name], param.device_mesh, param.placements, src_data_rank=None)
                torch.testing.assert_close(param.to_local(), cut.to_local(), atol=0, rtol=0, msg=f"rank {rank} {name}")
        finally:
            dist.destroy_process_group()
    packed_whole = {key for key, numel, full in reads if ".wqkv." in key and numel == full}
    assert all(numel < full for key, numel, full in reads if ".wqkv." not in key)
    assert packed_whole == ({key for key, _, _ in reads if ".wqkv." in key})


def test_qwen1_packed_c_attn_and_swapped_mlp(tmp_path, monkeypatch):
    args = dataclasses.replace(TINY, num_kv_heads=4, qkv_bias=True, norm_eps=1e-6)  # Qwen 1 is MHA, c_attn has a bias
    ref = _ours(args)
    _randomize(ref)
    sd = ref.state_dict()
    hf_sd = {"transformer.wte.weight": sd["tok_embeddings.weight"], "transformer.ln_f.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    for i in range(args.num_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):  # c_attn = Linear(dim, 3 * dim): q, k, v stacked along the output
            hf_sd[h + f"attn.c_attn.{kind}"] = torch.cat([sd[p + f"attention.w{x}.{kind}"] for x in "qkv"])
        hf_sd[h + "attn.c_proj.weight"] = sd[p + "attention.wo.weight"]
        hf_sd[h + "mlp.w1.weight"] = sd[p + "feed_forward.w3.weight"]  # up
        hf_sd[h + "mlp.w2.weight"] = sd[p + "feed_forward.w1.weight"]  # gate
        hf_sd[h + "mlp.c_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        hf_sd[h + "ln_1.weight"] = sd[p + "attention_norm.weight"]
        hf_sd[h + "ln_2.weight"] = sd[p + "ffn_norm.weight"]
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 2 * 96, "kv_channels": 16, "vocab_size": 128,
              "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 64,
              "no_bias": True, "tie_word_embeddings": False}
    assert model_args_from_hf_config(config) == args
    model = _ours(args, seed=3)
    load_hf_weights(model, _save(tmp_path, hf_sd, config), args)
    _assert_same(model, ref)
    _assert_export_equals(tmp_path, ref, args, "qwen", hf_sd)  # and export writes the same layout
    _assert_fsdp_tp_import_equals(tmp_path, args, ref, monkeypatch)

    # Qwen 1's MLP, written as in its modeling code, equals ours after the mapping.
    x = torch.randn(3, args.dim)
    h = "transformer.h.0."
    a1, a2 = F.linear(x, hf_sd[h + "mlp.w1.weight"]), F.linear(x, hf_sd[h + "mlp.w2.weight"])
    torch.testing.assert_close(F.linear(a1 * F.silu(a2), hf_sd[h + "mlp.c_proj.weight"]),
                               model.layers["0"].feed_forward(x), atol=ATOL, rtol=0)


def _pack_internlm2(wq, wk, wv, args):
    """InternLM2's wqkv: per key/value group, its q_per_kv query heads, then its key head and value head."""
    kv, hd = args.num_kv_heads, args.head_dim
    g = args.num_heads // kv
    rest = wq.shape[1:]
    return torch.cat([wq.reshape(kv, g, hd, *rest), wk.reshape(kv, 1, hd, *rest), wv.reshape(kv, 1, hd, *rest)],
                     dim=1).reshape(-1, *rest)


@pytest.mark.parametrize("bias", [False, True])
def test_internlm2_packed_wqkv(tmp_path, bias, monkeypatch):
    args = dataclasses.replace(TINY, num_heads=8, num_kv_heads=2, qkv_bias=bias, out_bias=bias, rope_theta=1e6)
    ref = _ours(args)
    _randomize(ref)
    sd = ref.state_dict()
    hf_sd = {"model.tok_embeddings.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "output.weight": sd["output.weight"]}
    for i in range(args.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if bias else ("weight",):
            hf_sd[h + f"attention.wqkv.{kind}"] = _pack_internlm2(*(sd[p + f"attention.w{x}.{kind}"] for x in "qkv"),
                                                                  args)
            hf_sd[h + f"attention.wo.{kind}"] = sd[p + f"attention.wo.{kind}"]
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"):
            hf_sd[h + name + ".weight"] = sd[p + name + ".weight"]
    config = {"model_type": "internlm2", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 128, "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "max_position_embeddings": 64, "bias": bias, "tie_word_embeddings": False}
    assert model_args_from_hf_config(config) == args
    model = _ours(args, seed=3)
    load_hf_weights(model, _save(tmp_path, hf_sd, config), args)
    _assert_same(model, ref)
    _assert_export_equals(tmp_path, ref, args, "internlm2", hf_sd)  # and export writes the same layout
    _assert_fsdp_tp_import_equals(tmp_path, args, ref, monkeypatch)

    # InternLM2's own unpacking ("b q (h gs d) -> b q h gs d", q = [..., :gs-2, :], k = [..., -2, :], v = [..., -1, :])
    # gives the projections of our wq/wk/wv.
    x = torch.randn(5, args.dim)
    g, hd, kv = args.num_heads // args.num_kv_heads, args.head_dim, args.num_kv_heads
    qkv = F.linear(x, hf_sd["model.layers.1.attention.wqkv.weight"],
                   hf_sd.get("model.layers.1.attention.wqkv.bias")).reshape(5, kv, g + 2, hd)
    attn = model.layers["1"].attention
    torch.testing.assert_close(qkv[:, :, :g].reshape(5, -1), attn.wq(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(qkv[:, :, -2].reshape(5, -1), attn.wk(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(qkv[:, :, -1].reshape(5, -1), attn.wv(x), atol=ATOL, rtol=0)


def test_internlm1_llama_names_with_qkvo_bias(tmp_path):
    args = dataclasses.replace(TINY, num_kv_heads=4, qkv_bias=True, out_bias=True, norm_eps=1e-6)
    ref = _ours(args)
    _randomize(ref)
    from torchtrain.models import to_hf_state_dict
    hf_sd = to_hf_state_dict(ref.state_dict(), args)
    assert "model.layers.0.self_attn.o_proj.bias" in hf_sd
    config = {"model_type": "internlm", "architectures": ["InternLMForCausalLM"], "hidden_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 128,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "bias": True, "tie_word_embeddings": False}
    assert model_args_from_hf_config(config) == args
    model = _ours(args, seed=3)
    load_hf_weights(model, _save(tmp_path, hf_sd, config), args)
    _assert_same(model, ref)


def test_model_args_from_hf_config_round_trips_hf_config():
    from test_hf_parity import CASES
    for args, family in CASES.values():
        assert model_args_from_hf_config(hf_config(args, family)) == args
    with pytest.raises(ValueError, match="valid choices"):
        model_args_from_hf_config({"model_type": "gpt2"})


def test_errors_name_folder_key_and_shapes(tmp_path):
    hf_sd = _hf_model(GQA, "llama").state_dict()
    missing = {k: v for k, v in hf_sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    folder = _save(tmp_path / "missing", missing, {})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_hf_weights(_ours(GQA), folder, GQA)
    assert str(folder) in str(e.value)

    wrong = dataclasses.replace(GQA, ffn_dim=80)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(80, 64\)") as e:
        load_hf_weights(_ours(wrong), _save(tmp_path / "shape", hf_sd, {}), wrong)
    assert str(tmp_path / "shape") in str(e.value)

    extra = {**hf_sd, "model.layers.2.mlp.up_proj.weight": hf_sd["model.layers.1.mlp.up_proj.weight"]}
    with pytest.raises(ValueError, match=r"no parameter for.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_weights(_ours(GQA), _save(tmp_path / "extra", extra, {}), GQA)
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_hf_weights(_ours(GQA), tmp_path / "nothing", GQA)


def test_initial_load_path_and_export_cli(tmp_path):
    """train() starts from an exported folder, with the model's shape from its config.json (model.name "hf"),
    and the export CLI turns its checkpoint back into that model."""
    from torchtrain.train import attention_inputs, build_data, train

    args = get_model_args("debug")
    start = _ours(args, seed=123)  # not the job seed's initialisation
    # A model folder carries its tokenizer; data.tokenizer "default" takes it (here the embedded one's file).
    export_hf(start.state_dict(), args, tmp_path / "start", "llama", tokenizer_path=load_tokenizer("default").path)

    # lr 1e-30: the one optimizer step leaves the weights unchanged in fp32, so the checkpoint holds `start`.
    # Compiled and checkpointed blocks, as the default recipe runs them: their wrappers add to the parameters'
    # names (aot_eager: the same wrapping as inductor's, without its code generation).
    overrides = tiny(tmp_path / "run", "--training.steps", "1", "--lr_scheduler.warmup_steps", "0",
                     "--optimizer.lr", "1e-30", "--training.val_every", "0", "--metrics.tensorboard", "false",
                     "--checkpoint.initial_load_path", str(tmp_path / "start"), "--model.name", "hf",
                     "--compile.enabled", "true", "--compile.backend", "aot_eager",
                     "--activation_checkpoint.mode", "full")
    config = load_config(REPO / "recipes/debug.toml", overrides)
    result = train(config)
    train_loader = build_data(config, args, 0, 1).train
    batch = next(iter(train_loader))
    with torch.no_grad():
        expected = start(batch.tokens, labels=batch.labels, **attention_inputs(batch, config)) / batch.num_valid_tokens()
    assert result.losses[1] == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # and not the loss of the job seed's own initialisation
        seed_init = _ours(args, seed=config.job.seed)(batch.tokens, labels=batch.labels, **attention_inputs(batch, config))
    assert result.losses[1] != pytest.approx(seed_init.item() / batch.num_valid_tokens(), rel=1e-4)

    checkpoint = next((tmp_path / "run/checkpoints").glob("step-*"))
    cli = ["--config", str(REPO / "recipes/debug.toml"), "--checkpoint", str(checkpoint), "--max-shard-mb", "3",
           *overrides]
    export_main([*cli, "--out", str(tmp_path / "out"), "--dtype", "float32"])
    tokens = batch.tokens[:2, :32]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, start(tokens), atol=ATOL, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok.decode(hf_tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"

    # By default the recipe's training dtype (debug.toml: auto, i.e. bfloat16): the weights rounded once.
    export_main([*cli, "--out", str(tmp_path / "bf16")])
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    rounded = _ours(args)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in start.state_dict().items()})
    assert any((p != q).any() for p, q in zip(rounded.parameters(), start.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, rounded(tokens), atol=ATOL, rtol=0)

    # Split among two processes: the same files, byte for byte.
    from launcher import torchrun
    torchrun(2, "torchtrain.export", *cli, "--out", tmp_path / "bf16_2", launch=("--standalone", "--module"))
    files = sorted(p.name for p in (tmp_path / "bf16").iterdir())
    assert len([f for f in files if f.startswith("model-")]) >= 3 and "model.safetensors.index.json" in files
    assert sorted(p.name for p in (tmp_path / "bf16_2").iterdir()) == files
    for name in files:
        assert (tmp_path / "bf16_2" / name).read_bytes() == (tmp_path / "bf16" / name).read_bytes(), name

    # Mistakes end in one error line naming the file or the choices (under torchrun too: rank 0 says it).
    with pytest.raises(SystemExit, match=r"^error: .*nothing is not a checkpoint folder"):
        export_main([*cli, "--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "nothing")])
    proc = torchrun(2, "torchtrain.export", *cli, "--out", tmp_path / "x", "--checkpoint", tmp_path / "nothing",
                    launch=("--standalone", "--module"), check=False)
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert "nothing is not a checkpoint folder" in proc.stderr
    # A damaged checkpoint file, found by whichever rank verifies it: said once, and no loadable folder is left.
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    data = max(damaged.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(raw)
    proc = torchrun(2, "torchtrain.export", *cli, "--out", tmp_path / "y", "--checkpoint", damaged,
                    launch=("--standalone", "--module"), check=False)
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1 and data.name in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "y" / "config.json").exists()
    with pytest.raises(SystemExit, match=r"^error: family .qwen. \(Qwen 1\) has as many key/value heads.*num_kv_heads="):
        export_main([*cli, "--out", str(tmp_path / "x"), "--family", "qwen"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A checkpoint export holds the tensor being read, never the ones already written (nor a whole shard)."""
    import weakref

    import torch.distributed.checkpoint as dcp

    from torchtrain import hf_checkpoint
    from torchtrain.hf_checkpoint import export_checkpoint

    args = dataclasses.replace(TINY, num_kv_heads=4, qkv_bias=True)
    model = _ours(args)
    _randomize(model)
    dcp.save({"model_and_optimizer": {"model": model.state_dict()}}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    alive, most = [], [0]
    real_load = dcp.load

    def load(state, **kwargs):  # (tensors are freed by reference counting, as soon as nothing holds them)
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        real_load(state, **kwargs)
        alive.extend(weakref.ref(t) for t in state["model_and_optimizer"]["model"].values())

    monkeypatch.setattr(dcp, "load", load)
    for family in ("qwen2", "qwen"):  # one tensor per read; q, k and v together for a packed one
        out = export_checkpoint(tmp_path / "ckpt", args, tmp_path / family, family, torch.float32,
                                max_shard_bytes=20_000)
        assert len(alive) == len(model.state_dict()) and most[0] == 0
        alive.clear()
        back = _ours(args, seed=99)
        load_hf_weights(back, out, args)
        _assert_same(back, model)
    assert not list((tmp_path / "qwen").glob(".*partial"))

    # A file cut in the middle (a checkpoint without checksums): the error names the checkpoint and the tensor;
    # the shards finished before it are whole, the one being written only under its temporary name, and no
    # config.json says the folder is complete.
    monkeypatch.setattr(dcp, "load", real_load)
    (shard,) = (tmp_path / "ckpt").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"ckpt: cannot read model_and_optimizer\.model\.layers\.\d"):
        export_checkpoint(tmp_path / "ckpt", args, tmp_path / "cut", "qwen2", torch.float32, max_shard_bytes=20_000)
    finished = list((tmp_path / "cut").glob("model-*.safetensors"))
    assert finished and len(list((tmp_path / "cut").glob(".model-*.safetensors.partial"))) == 1
    assert not (tmp_path / "cut/config.json").exists()
    from safetensors import safe_open
    for path in finished:
        with safe_open(path, "pt") as f:
            assert all(f.get_tensor(key).numel() for key in f.keys())


def test_hf_model_name_needs_a_readable_config_json(tmp_path):
    from torchtrain.config import ConfigError
    from torchtrain.models.shape import model_args_for

    recipe = REPO / "recipes/debug.toml"
    with pytest.raises(ConfigError, match=r"model.name = 'hf' is invalid; 'hf' takes the model's shape from the "
                                          r"config.json of checkpoint.initial_load_path"):
        load_config(recipe, ["--model.name", "hf"])
    with pytest.raises(ConfigError, match=r"checkpoint.initial_load_path = '.*nothing' is invalid; its config.json "
                                          r"gives no model shape: .*nothing has no config.json"):
        model_args_for(load_config(recipe, ["--model.name", "hf", "--checkpoint.initial_load_path",
                                            str(tmp_path / "nothing")]), torch.device("cpu"))
    args = dataclasses.replace(get_model_args("debug"), max_seq_len=128)
    export_hf(_ours(args).state_dict(), args, tmp_path / "hf", "llama")
    config = load_config(recipe, ["--model.name", "hf", "--checkpoint.initial_load_path", str(tmp_path / "hf"),
                                  "--training.seq_len", "256"])
    got = model_args_for(config, torch.device("cpu"))
    # The shape of config.json; the RoPE table stretched to the (longer) training context.
    assert got == dataclasses.replace(args, max_seq_len=256, attention="sdpa")


def test_export_defaults_and_family_choices(tmp_path, capsys):
    """--family defaults to the family the run started from (model.name "hf"), else llama; --dtype to the recipe's
    training dtype; an unknown family is one error line listing the choices."""
    from torchtrain.export import default_dtype, default_family
    from torchtrain.models.hf import export_families

    recipe = REPO / "recipes/debug.toml"
    for model_type, family in (("qwen2", "qwen2"), ("internlm", "llama"), ("internlm2", "internlm2"), ("qwen", "qwen")):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        hf_run = load_config(recipe, ["--model.name", "hf", "--checkpoint.initial_load_path", str(tmp_path / model_type)])
        assert default_family(hf_run) == family
        registry_run = load_config(recipe, ["--checkpoint.initial_load_path", str(tmp_path / model_type)])
        assert default_family(registry_run) == "llama"
    assert default_dtype(load_config(recipe, [])) == "bfloat16"
    assert default_dtype(load_config(recipe, ["--training.dtype", "float32"])) == "float32"
    with pytest.raises(SystemExit):
        export_main(["--config", str(recipe), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"),
                     "--family", "gpt2"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --family: invalid choice: 'gpt2'" in error
    assert all(family in error for family in export_families())


# name: (processes, samples per data-parallel rank for the single run's global batch of 4, recipe overrides)
SHARDED_LAYOUTS = {
    "fsdp2": (2, 2, ["--parallelism.dp_shard", "2"]),
    "fsdp2_tp2": (4, 2, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    "pp2": (2, 4, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1"]),
}


def _train_losses(folder: Path, run: str, start: Path, nproc: int, local_batch_size: int, *layout: str,
                  reads: Path | None = None) -> dict:
    """The first steps' losses and gradient norms of a run starting from the HF folder ``start``; with ``reads``,
    each rank writes there the blocks it read from the safetensors files."""
    from launcher import torchrun

    out = folder / f"{run}.json"
    torchrun(nproc, REPO / "tests/workers/train_losses.py", "--out", out,
             *(("--hf-reads", reads) if reads else ()), "--config", REPO / "recipes/debug.toml",
             *tiny(folder / run, "--training.steps", "3", "--training.val_every", "0",
                   "--checkpoint.enabled", "false", "--metrics.tensorboard", "false",
                   "--training.local_batch_size", str(local_batch_size), "--model.name", "hf",
                   "--checkpoint.initial_load_path", str(start), *layout))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory):
    """A random debug model as a sharded HF folder, and the single-process run starting from it (shared by the layouts)."""
    folder = tmp_path_factory.mktemp("hf_start")
    args = get_model_args("debug")
    export_hf(_ours(args, seed=123).state_dict(), args, folder / "start", "llama", max_shard_bytes=2 * 2**20,
              tokenizer_path=load_tokenizer("default").path)
    assert len(set(hf_weight_files(folder / "start").values())) > 2  # several shard files behind an index
    return folder / "start", _train_losses(folder, "single", folder / "start", 1, 4, "--parallelism.dp_shard", "1")


@pytest.mark.parametrize("name", SHARDED_LAYOUTS)
def test_import_into_sharded_layouts_trains_like_one_process(tmp_path, hf_start, name):
    """Each rank fills only its shards (FSDP x TP DTensors) or its stage's blocks (PP) from a sharded HF folder:
    the losses and gradient norms of the first steps equal the single-process run's. Under FSDP (x TP) each rank
    reads only its own block of each tensor from the files, and the ranks' blocks cover every tensor; under PP
    each stage reads its own tensors whole."""
    start, single = hf_start
    nproc, local_batch_size, layout = SHARDED_LAYOUTS[name]
    sharded = _train_losses(tmp_path, name, start, nproc, local_batch_size, *layout, reads=tmp_path / "reads")
    for step in single["losses"]:
        assert sharded["losses"][step] == pytest.approx(single["losses"][step], rel=2e-5), step
        assert sharded["grad_norms"][step] == pytest.approx(single["grad_norms"][step], rel=5e-4), step
    if name == "pp2":  # each stage reads whole tensors, of its own blocks only: every tensor is read once
        stages = [json.loads((tmp_path / "reads" / f"rank{rank}.json").read_text()) for rank in range(nproc)]
        assert all(list(shape) == list(full) for reads in stages for _, shape, full in reads)
        keys = [{key for key, _, _ in reads} for reads in stages]
        assert not keys[0] & keys[1] and keys[0] | keys[1] == set(hf_weight_files(start)), keys
        assert "model.embed_tokens.weight" in keys[0] and "lm_head.weight" in keys[1]
        return
    read_numel: dict[str, int] = {}
    full_numel: dict[str, int] = {}
    for rank in range(nproc):
        for key, shape, full in json.loads((tmp_path / "reads" / f"rank{rank}.json").read_text()):
            # every parameter is sharded over the 2 FSDP ranks (along its rows), so no rank reads more than half
            assert 0 < math.prod(shape) <= math.prod(full) // 2 and shape[0] <= full[0] // 2, (rank, key, shape, full)
            read_numel[key] = read_numel.get(key, 0) + math.prod(shape)
            full_numel[key] = math.prod(full)
    assert set(read_numel) == set(hf_weight_files(start))
    for key, numel in read_numel.items():  # TP replicates some tensors (the norms): those are read by 2 ranks
        assert numel in ((full_numel[key],) if name == "fsdp2" else (full_numel[key], 2 * full_numel[key])), key
