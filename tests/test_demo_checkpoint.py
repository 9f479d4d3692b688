"""The demo checkpoint writer and its tokenizer: hub layout, determinism, transformers compatibility."""

import dataclasses
import json
import re
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, LlamaTokenizer, MixtralForCausalLM

from mixserve.cli import main
from mixserve.shards.demo.checkpoint import (
    DemoConfig,
    demo_checkpoint_dir,
    ensure_demo_checkpoint,
    write_demo_checkpoint,
)
from mixserve.shards.demo.tokenizer import METASPACE, SPECIAL_TOKENS, train_tokenizer

TINY = DemoConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=512,
    seed=7,
    num_weight_files=3,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", TINY)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def read_tensors(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the checkpoint, and which file each came from."""
    tensors, found_in = {}, {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert name not in tensors, f"{name} is stored twice"
                tensors[name], found_in[name] = f.get_tensor(name), path.name
    return tensors, found_in


def expected_shapes(c: DemoConfig) -> dict[str, tuple[int, ...]]:
    h, d = c.hidden_size, c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (c.vocab_size, h),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            f"{p}.self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            f"{p}.self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            f"{p}.self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            f"{p}.block_sparse_moe.gate.weight": (c.num_local_experts, h),
        }
        for e in range(c.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes |= {
                f"{q}.w1.weight": (c.intermediate_size, h),
                f"{q}.w2.weight": (h, c.intermediate_size),
                f"{q}.w3.weight": (c.intermediate_size, h),
            }
    return shapes


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_hub_layout_names_shapes_and_index(which, tiny_dir, demo_dir):
    ckpt, config = (tiny_dir, TINY) if which == "tiny" else (demo_dir, DemoConfig())
    tensors, found_in = read_tensors(ckpt)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected_shapes(config)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    n = config.num_weight_files
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == found_in
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())

    # Random, not an init a loader could reproduce by accident: norms near but not at 1.
    norm = tensors["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and (norm - 1).abs().max() < 0.2
    assert 0.015 < tensors["lm_head.weight"].std() < 0.025

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).is_file()
    assert json.loads((ckpt / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }


def test_same_config_same_bytes_other_seed_other_weights(tiny_dir, tmp_path):
    again = write_demo_checkpoint(tmp_path / "again", TINY)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name

    other = write_demo_checkpoint(tmp_path / "other", dataclasses.replace(TINY, seed=8))
    ours, theirs = read_tensors(tiny_dir)[0], read_tensors(other)[0]
    assert not torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


def test_config_reads_back_through_transformers(tiny_dir):
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "mixtral" and config.architectures == ["MixtralForCausalLM"]
    for field in dataclasses.fields(DemoConfig):
        if field.name not in ("seed", "num_weight_files", "train_steps"):
            assert getattr(config, field.name) == getattr(TINY, field.name), field.name
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.head_dim == TINY.head_dim
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.rms_norm_eps == 1e-5 and config.sliding_window is None and config.tie_word_embeddings is False
    assert config.dtype == torch.float32
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2 and generation["do_sample"]


def test_transformers_loads_every_tensor_as_written(tiny_dir):
    model, info = MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tensors, _ = read_tensors(tiny_dir)
    params = dict(model.named_parameters())
    # transformers 5 keeps experts fused in memory: gate_up_proj [E, 2I, H] = cat(w1, w3), down_proj [E, H, I].
    expected: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".block_sparse_moe.experts." not in name:
            expected[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
    for i in range(TINY.num_hidden_layers):
        experts = [f"model.layers.{i}.block_sparse_moe.experts.{e}" for e in range(TINY.num_local_experts)]
        expected[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{x}.w1.weight"], tensors[f"{x}.w3.weight"]]) for x in experts]
        )
        expected[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([tensors[f"{x}.w2.weight"] for x in experts])
    assert params.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(params[name].data, tensor, rtol=0, atol=0, msg=name)


def test_tokenizer_loads_with_the_model_vocab_and_special_ids(tokenizer, tiny_dir):
    assert len(tokenizer) == DemoConfig().vocab_size
    assert len(AutoTokenizer.from_pretrained(tiny_dir)) == TINY.vocab_size
    assert [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token] == list(SPECIAL_TOKENS)
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer.convert_ids_to_tokens([3, 3 + 0x41, 258]) == ["<0x00>", "<0x41>", "<0xFF>"]
    assert tokenizer("Hello world").input_ids[0] == 1
    assert tokenizer.model_max_length == 4096


def test_transformers_llama_class_rebuilds_the_same_pipeline(tokenizer, demo_dir):
    llama = LlamaTokenizer.from_pretrained(demo_dir)
    for text in ["The function returns a list.", "  two  spaces\n\ttab 🤗 中文", "x</s>y", ""]:
        assert llama(text).input_ids == tokenizer(text).input_ids, text


# Any Unicode, plus the pieces where a byte-fallback BPE goes wrong: runs of whitespace, emoji, CJK,
# combining marks, zero-width characters, and real words so merges fire next to them.
ROUND_TRIP_TEXT = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=4),
        st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "🤗", "中文", "e\u0301", "\u200b", "the", " value", " return"]),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=ROUND_TRIP_TEXT)
def test_decode_encode_round_trips(tokenizer, text):
    if METASPACE in text or any(token in text for token in SPECIAL_TOKENS):
        return  # the documented exceptions, checked in the next test
    expected = text[1:] if text.startswith(" ") else text
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == expected


def test_documented_round_trip_exceptions(demo_dir):
    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))

    def round_trip(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text).ids)

    assert round_trip(" a") == "a" and round_trip("  a ") == " a "
    assert round_trip(f"a{METASPACE}b") == "a b"
    assert round_trip("a</s>b") == "ab"
    assert round_trip("line one\n  indented, trailing  ") == "line one\n  indented, trailing  "


def test_random_ids_decode_to_words(tokenizer):
    vocab_size = len(tokenizer)
    pieces = [tokenizer.decode([i]).strip() for i in range(vocab_size)]
    assert sum(piece.isalpha() for piece in pieces) > 0.85 * vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(259, vocab_size, (200,), generator=generator).tolist()
    words = tokenizer.decode(ids).split()
    assert sum(bool(re.fullmatch(r"[A-Za-z_]+", w)) for w in words) > 0.7 * len(words)


def test_training_is_deterministic(demo_dir):
    assert train_tokenizer(DemoConfig().vocab_size).to_str(pretty=True) == (demo_dir / "tokenizer.json").read_text()


def test_corpus_is_large_enough_for_the_benchmark_vocab_and_says_its_limit():
    with pytest.raises(ValueError, match="corpus yields only") as error:
        train_tokenizer(1_000_000)
    most = int(re.search(r"at most (\d+) ids", str(error.value)).group(1))
    assert most >= 32000  # the benchmark's model size
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(300)


def test_chat_template_renders_mistral_inst_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>[INST] Answer briefly.\n\nHi [/INST] Hello.</s>[INST] Again [/INST]"
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False) == "<s>[INST] Hi [/INST]"


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        (["assistant"], "must alternate"),
        (["user", "user"], "must alternate"),
        (["system", "user", "user"], "must alternate"),
        (["user", "tool"], "Unknown role 'tool'"),
        (["user", "assistant", "system"], "Only the first message may have the system role"),
        (["system"], "must be followed by a user message"),
    ],
)
def test_chat_template_rejects_bad_role_order(tokenizer, roles, message):
    with pytest.raises(Exception, match=message):
        tokenizer.apply_chat_template([{"role": r, "content": "x"} for r in roles], tokenize=False)


@pytest.mark.parametrize(
    "changes",
    [
        {"hidden_size": 0},
        {"hidden_size": 100},
        {"num_key_value_heads": 3},
        {"num_experts_per_tok": 9},
        {"num_weight_files": 1},
        {"num_weight_files": 6},
        {"vocab_size": 512.0},
    ],
)
def test_config_rejects_bad_sizes(changes):
    with pytest.raises((ValueError, TypeError)):
        DemoConfig(**changes)


def test_cache_writes_once_even_when_processes_race(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSERVE_CACHE", str(tmp_path / "cache"))
    target = demo_checkpoint_dir(TINY)
    assert target.parent == tmp_path / "cache" and target.name.startswith("demo-")
    assert demo_checkpoint_dir(dataclasses.replace(TINY, seed=8)) != target

    results: list[Path] = []
    racers = [threading.Thread(target=lambda: results.append(ensure_demo_checkpoint(TINY))) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert results == [target, target]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]  # no staging dir left over
    stamp = (target / "config.json").stat().st_mtime_ns
    assert ensure_demo_checkpoint(TINY) == target
    assert (target / "config.json").stat().st_mtime_ns == stamp


def test_cli_writes_a_checkpoint(tmp_path, tiny_dir):
    flags = {
        "--hidden-size": TINY.hidden_size,
        "--num-layers": TINY.num_hidden_layers,
        "--num-heads": TINY.num_attention_heads,
        "--num-kv-heads": TINY.num_key_value_heads,
        "--intermediate-size": TINY.intermediate_size,
        "--num-experts": TINY.num_local_experts,
        "--experts-per-token": TINY.num_experts_per_tok,
        "--vocab-size": TINY.vocab_size,
        "--seed": TINY.seed,
        "--num-weight-files": TINY.num_weight_files,
    }
    args = [str(part) for flag, value in flags.items() for part in (flag, value)]
    assert main(["demo-model", str(tmp_path / "cli"), *args]) == 0
    for path in tiny_dir.iterdir():
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_trained_checkpoint_keeps_the_layout_and_learns(tmp_path, tiny_dir):
    """`--train-steps`: the same files, names and shapes, trained weights, the same bytes when rerun."""
    trained = dataclasses.replace(TINY, train_steps=4)
    first = write_demo_checkpoint(tmp_path / "a", trained)
    second = write_demo_checkpoint(tmp_path / "b", trained)
    random_tensors, _ = read_tensors(tiny_dir)
    first_tensors, _ = read_tensors(first)
    second_tensors, _ = read_tensors(second)
    assert {n: t.shape for n, t in first_tensors.items()} == {n: t.shape for n, t in random_tensors.items()}
    assert sorted(p.name for p in first.glob("*.safetensors")) == sorted(p.name for p in tiny_dir.glob("*.safetensors"))
    assert all(torch.equal(first_tensors[n], second_tensors[n]) for n in first_tensors)
    changed = [n for n in first_tensors if not torch.equal(first_tensors[n], random_tensors[n])]
    assert "lm_head.weight" in changed and any(".experts." in n for n in changed)
    with pytest.raises(ValueError, match="train_steps"):
        DemoConfig(train_steps=-1)


def test_a_time_budget_shortens_training_after_timing_its_first_steps(tmp_path, caplog):
    """`Training(time_budget_s=...)`: after step 1 + TIMED_STEPS the run takes the steps that fit the budget
    (none left: one more), the schedule with them; without a budget every step runs."""
    from mixserve.shards.demo import train

    caplog.set_level("INFO", logger="mixserve.shards.demo.train")
    config = dataclasses.replace(TINY, train_steps=40)
    write_demo_checkpoint(tmp_path / "cut", config, train.Training(peak_learning_rate=1e-3, time_budget_s=0.0))
    last = 2 + train.TIMED_STEPS
    assert f"demo training shortened steps={last} of=40" in caplog.text
    assert f"demo training step={last}/{last} " in caplog.text
    assert train._steps_within(40, 6, 1.0, 0.1) == 16 and train._steps_within(10, 6, 5.0, 0.1) == 10
    assert train._steps_within(40, 6, -3.0, 0.1) == 7 and train._steps_within(40, 6, 1.0, 0.0) == 40
