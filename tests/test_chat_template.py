"""`--chat-template` (router/chat_template.py): a template from a file or inline, refused at start-up where it
is neither or does not compile, and served: a base checkpoint without a template answers chat requests
rendered with the given one."""

import argparse
import json
from pathlib import Path

import aiohttp
import pytest
from transformers import AutoTokenizer

from mixserve.router import launch_args
from mixserve.router.chat_template import ChatTemplate, read_chat_template
from mixserve.router.launch_serving import load_tokenizer

# A template unlike the demo's [INST] one, so that a prompt shows which template rendered it.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
RENDERED = "<s><<system>> Be brief.\n<<user>> Name a river.\n<<assistant>>"


@pytest.fixture(scope="module")
def base_dir(demo_dir, tmp_path_factory) -> Path:
    """The demo checkpoint as a base model ships: the same files, its tokenizer_config without a chat template."""
    out = tmp_path_factory.mktemp("base") / "mixtral-base"
    out.mkdir()
    for path in demo_dir.iterdir():
        (out / path.name).symlink_to(path)
    (out / "tokenizer_config.json").unlink()
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert config.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_a_file_or_inline_text(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE + "\\n", encoding="utf-8")  # a file is taken as it is: its backslash stays
    assert read_chat_template(str(path)) == ChatTemplate(TEMPLATE + "\\n", str(path))
    # Inline, escapes typed on one line are unescaped and other characters kept, non-ASCII among them.
    inline = read_chat_template("{% for m in messages %}{{ m.content }}\\n{% endfor %}é✓")
    assert inline.text == "{% for m in messages %}{{ m.content }}\n{% endfor %}é✓" and inline.source == "inline"
    # Compiled in transformers' environment: its loop controls and its own generation tag are known.
    tagged = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% break %}{% endfor %}"
    assert read_chat_template(tagged).text == tagged


def test_what_is_refused_says_why(tmp_path):
    cases = {
        "templates/chatml.jinja": "is no file, and no Jinja template",
        "{% for m in messages %}{{ m.content }{% endfor %}": "does not compile (line 1): unexpected '}'",
        "{% if messages %}{{ 1 }}": "does not compile",
        "{{ 1 }}\\x4": "malformed backslash escape",
    }
    for value, reason in cases.items():
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            read_chat_template(value)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ValueError, match=f"from {broken} does not compile \\(line 2\\)"):
        read_chat_template(str(broken))


def test_the_flag_stops_the_launch_at_parsing(capsys):
    parser = argparse.ArgumentParser()
    launch_args.add_arguments(parser)
    assert parser.parse_args([]).chat_template is None
    assert parser.parse_args(["--chat-template", TEMPLATE]).chat_template.text == TEMPLATE
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--chat-template", "missing.jinja"])
    assert stopped.value.code == 2 and "'missing.jinja' is no file" in capsys.readouterr().err


def test_the_router_tokenizer_takes_it_in_place_of_the_checkpoints(demo_dir, base_dir):
    template = read_chat_template(TEMPLATE)
    assert load_tokenizer(str(base_dir)).chat_template is None
    for model in (base_dir, demo_dir):  # none of its own, and one of its own ([INST]) replaced
        tokenizer = load_tokenizer(str(model), template)
        assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == RENDERED


@pytest.mark.slow
async def test_a_base_checkpoint_serves_chat_with_the_flag(launch, base_dir, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    server = launch("--model", str(base_dir), "--num-shard", "1", "--chat-template", str(template_file))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    expected = tokenizer(RENDERED, add_special_tokens=False)["input_ids"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/tokenize", json={"messages": CHAT}) as response:
            assert (await response.json())["tokens"] == expected
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
        async with session.post(f"{server.url}/v1/chat/completions", json=body) as response:
            answer = await response.json()
            assert response.status == 200, answer
            assert answer["usage"]["prompt_tokens"] == len(expected)
        async with session.get(f"{server.url}/tokenizer_info") as response:
            assert (await response.json())["chat_template"] == TEMPLATE
    server.stop()  # free the CPU for the modules after this one
