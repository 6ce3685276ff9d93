"""Generation: the KV cache against recomputing the whole sequence, greedy decoding against transformers,
top-p / seeds / argument checks, and ``python -m torchtrain.generate`` on a training run and on a Hugging
Face folder.

Tiny fp32 models on the CPU; nothing is downloaded.
"""

import dataclasses
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from launcher import REPO  # noqa: E402
from test_hf_parity import TINY, _hf_model, _randomize  # noqa: E402
from test_train import run  # noqa: E402
from torchtrain.data.tokenizer import tokenizer_from_file  # noqa: E402
from torchtrain.export import recipe_tokenizer  # noqa: E402
from torchtrain.generate import generate, load_model, main, resolve_source, sample_next  # noqa: E402
from torchtrain.models import Transformer, get_model_args  # noqa: E402
from torchtrain.models.kv_cache import KVCache  # noqa: E402


def _model(args=TINY, seed=0, randomize=True) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    if randomize:  # larger weights than the init's: peaked, seed-dependent next-token distributions
        _randomize(model, seed)
    return model.eval()


def _prompt(batch=2, length=7, vocab=TINY.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("args", [TINY, dataclasses.replace(TINY, num_kv_heads=4, qkv_bias=True)], ids=["gqa", "mha"])
def test_kv_cache_matches_recomputing_the_sequence(args):
    model = _model(args)
    tokens = _prompt()
    cache = KVCache.for_model(model, batch_size=2, max_len=20)
    with torch.no_grad():
        step_logits = model(tokens, kv_cache=cache)  # prefill: the same logits as without a cache
        torch.testing.assert_close(step_logits, model(tokens), atol=1e-5, rtol=0)
        for _ in range(12):
            token = step_logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            step_logits = model(token, kv_cache=cache)
            torch.testing.assert_close(step_logits[:, -1], model(tokens)[:, -1], atol=1e-5, rtol=0)
    assert cache.length == tokens.shape[1]
    out = generate(model, _prompt(), max_new_tokens=12)
    assert torch.equal(out, tokens[:, :19])  # generate() decodes the same way

    with torch.no_grad():
        model(tokens[:, :1], kv_cache=cache)  # 19 cached, max_len 20: one more fits
        with pytest.raises(ValueError, match="KV cache is full"):
            model(tokens[:, :1], kv_cache=cache)
        # A prompt fed in chunks (3, then 4 tokens) gives the logits of the whole prompt at once.
        cache.reset()
        first = model(tokens[:, :3], kv_cache=cache)
        second = model(tokens[:, 3:7], kv_cache=cache)
        torch.testing.assert_close(torch.cat([first, second], dim=1), model(tokens[:, :7]), atol=1e-5, rtol=0)
    cache.reset()
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens[:, :3], document_ids=torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)


def test_stops_at_eos_and_pads_finished_sequences():
    model = _model()
    greedy = generate(model, _prompt(), max_new_tokens=10)[:, 7:]  # the continuations alone
    eos = int(greedy[0, 2])  # the first sequence's third new token
    assert eos not in greedy[0, :2] and eos not in greedy[1], "the test needs a token only sequence 0 makes"
    out = generate(model, _prompt(), max_new_tokens=10, eos_id=eos)[:, 7:]
    assert out.shape == (2, 10)  # sequence 1 never ends: all 10 steps
    assert torch.equal(out[0, :3], greedy[0, :3]) and (out[0, 3:] == eos).all()  # padded after its end
    assert torch.equal(out[1], greedy[1])
    # Once every sequence has ended (sequence 1 at its first token), generation stops.
    out = generate(model, _prompt(), max_new_tokens=10, eos_id=[eos, int(greedy[1, 0])])[:, 7:]
    assert out.shape == (2, 3) and torch.equal(out[0], greedy[0, :3])
    assert out[1].tolist() == [greedy[1, 0], eos, eos]  # padded with the first end token
    single = generate(model, _prompt()[0].tolist(), max_new_tokens=10, eos_id=eos)
    assert single.shape == (7 + 3,) and torch.equal(single[7:], greedy[0, :3])


def test_greedy_equals_transformers_generate(tmp_path):
    hf_model = _hf_model(TINY, "llama")  # GQA: 4 query heads, 2 key/value heads
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(resolve_source(tmp_path), torch.device("cpu"), torch.float32)
    prompt = _prompt(batch=1)
    eos = hf_model.generation_config.eos_token_id
    with torch.no_grad():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ours = generate(model, prompt, max_new_tokens=24, eos_id=eos)
    assert torch.equal(ours, expected)


def test_sampling_top_p_seed_and_argument_checks():
    model = _model()
    greedy = generate(model, _prompt(), max_new_tokens=10)

    def sample(seed, **kw):
        return generate(model, _prompt(), max_new_tokens=10, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0, top_p=1e-6), greedy)  # the nucleus is the likeliest token alone
    assert torch.equal(sample(0, top_k=1), greedy)
    assert torch.equal(sample(5), sample(5)) and torch.equal(sample(5, top_p=0.8), sample(5, top_p=0.8))
    assert not torch.equal(sample(5), sample(6))
    assert not torch.equal(sample(5), greedy)

    # top-p keeps the smallest set of likeliest tokens reaching p: here {0, 1} (0.5 + 0.3 >= 0.7).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    drawn = {int(sample_next(logits, 1.0, 0.7, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}

    for kw, match in (({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                      ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")):
        with pytest.raises(ValueError, match=match):
            generate(model, _prompt(), max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, _prompt(), max_new_tokens=TINY.max_seq_len)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [1, TINY.vocab_size], max_new_tokens=2)


def test_cli_on_a_training_run_and_a_hugging_face_folder(tmp_path, capsys):
    # lr 1e-30: the one optimizer step leaves the weights as initialised from job.seed 0.
    run(tmp_path / "run", "--training.steps", "1", "--lr_scheduler.warmup_steps", "0", "--optimizer.lr", "1e-30",
        "--training.val_every", "0", "--metrics.tensorboard", "false")
    tokenizer = tokenizer_from_file(recipe_tokenizer(resolve_source(tmp_path / "run").config))
    model = _model(get_model_args("debug"), seed=0, randomize=False)  # what the run started from
    prompt = [tokenizer.eos_id, *tokenizer.encode("def main(")]
    text = tokenizer.decode(generate(model, prompt, 12, eos_id=tokenizer.eos_id).tolist(), skip_special_tokens=True)
    assert text.startswith("def main(") and len(text) > len("def main(")

    # The run's folder (its newest checkpoint) and the checkpoint itself. NOTE: the training run
    # left its log handler on stdout, so the printed text is the end of what was captured.
    capsys.readouterr()
    main(["--checkpoint", str(tmp_path / "run"), "--prompt", "def main(", "--max-new-tokens", "12"])
    assert capsys.readouterr().out.endswith("\n" + text + "\n")
    main(["--checkpoint", str(next((tmp_path / "run/checkpoints").glob("step-*"))), "--prompt", "def main(",
          "--max-new-tokens", "12", "--dtype", "float32", "--device", "cpu"])
    assert capsys.readouterr().out.endswith("\n" + text + "\n")
    # A checkpoint moved out of its run: the model named in its torchtrain.json, the tokenizer given.
    shutil.copytree(next((tmp_path / "run/checkpoints").glob("step-*")), tmp_path / "moved")
    main(["--checkpoint", str(tmp_path / "moved"), "--prompt", "def main(", "--max-new-tokens", "12",
          "--tokenizer", str(tokenizer.path)])
    assert capsys.readouterr().out.endswith("\n" + text + "\n")

    hf_model = _hf_model(TINY, "llama")
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = _prompt(batch=1)
    eos = hf_model.generation_config.eos_token_id
    with torch.no_grad():
        expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos)
    main(["--checkpoint", str(tmp_path / "hf"), "--prompt-ids", ",".join(map(str, ids[0].tolist())),
          "--max-new-tokens", "10"])
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.split() == [str(t) for t in expected[0].tolist()]


def test_cli_errors_name_the_problem_before_loading(tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        return str(e.value.code)

    assert "does not exist" in error("--checkpoint", str(tmp_path / "missing"))
    assert "Hugging Face" in error("--checkpoint", str(tmp_path / "missing"))  # and lists what it accepts
    assert "neither a checkpoint" in error("--checkpoint", str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.toml").write_text((REPO / "recipes/debug.toml").read_text())
    assert "has no checkpoint" in error("--checkpoint", str(tmp_path / "run"))
    assert "top_p" in error("--checkpoint", str(tmp_path / "run"), "--top-p", "2")
    hf = tmp_path / "hf"  # a config.json and no weights: the prompt is refused before they would be read
    _hf_model(TINY, "llama").config.save_pretrained(hf)
    assert "leave no room in the model's 64 positions" in error("--checkpoint", str(hf), "--prompt-ids", "1 " * 64)
    assert "0..127" in error("--checkpoint", str(hf), "--prompt-ids", "1 128")
    assert "no tokenizer" in error("--checkpoint", str(hf), "--prompt", "hello")
    assert "no GPU" in error("--checkpoint", str(tmp_path / "run"), "--device", "cuda") or torch.cuda.is_available()
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'fp8' (choose from ...)"
        main(["--checkpoint", str(tmp_path / "run"), "--dtype", "fp8"])
    assert "choose from" in capsys.readouterr().err
