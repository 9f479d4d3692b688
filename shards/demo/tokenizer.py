"""The demo tokenizer: a Mistral / Llama style byte-fallback BPE trained on `corpus.txt`.

Vocabulary layout, as in Mistral's own tokenizer.json:

    0 <unk>, 1 <s>, 2 </s>          special added tokens
    3 .. 258                        byte tokens <0x00> .. <0xFF> (byte fallback)
    259 ..                          single characters of the corpus, then merged pieces in merge order

Pipeline, also as Mistral's: no normalizer; Metaspace pre-tokenizer (spaces become "▁", one "▁"
prepended to the first section, no splitting); BPE with byte fallback; post-processor adds <s>;
decoder Replace("▁", " ") → ByteFallback → Fuse → Strip one leading space.

`decode(encode(s), skip_special_tokens=True) == s` for every string except three cases the Llama
scheme cannot round-trip, exactly as with the real Mistral tokenizer:
- text that starts with a space loses that one space (Metaspace prepends "▁" only to text that
  does not already start with one, and the decoder always strips one leading space), so
  " a" and "a" both decode as "a" and "  a" decodes as " a";
- a literal "▁" (U+2581) in the text decodes as a space;
- a literal "<unk>", "<s>" or "</s>" in the text is encoded as that special token, so decoding
  with skip_special_tokens=True drops it.
"""

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
METASPACE = "\u2581"
CORPUS_PATH = Path(__file__).with_name("corpus.txt")

# Mixtral-Instruct's format, "<s>[INST] user [/INST] answer</s>[INST] ...", with a leading system
# message merged into the first user turn as Mistral's later templates do.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- if not loop_messages %}"
    "{{- raise_exception('A system message must be followed by a user message.') }}"
    "{%- endif %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- raise_exception('Only the first message may have the system role.') }}"
    "{%- elif message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception(\"Unknown role '\" + message['role'] + \"': expected system, user or assistant.\") }}"
    "{%- endif %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... "
    "after an optional leading system message.') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def corpus_lines() -> list[str]:
    """The training corpus, one paragraph per line, without its attribution header."""
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("# ")]


def _learn_pieces(num_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus; return its pieces (characters, then merged pieces in merge order) and merges."""
    trainer_tokenizer = Tokenizer(models.BPE())
    # Training splits where SentencePiece would (whitespace, punctuation, each digit) so pieces are
    # words and word parts; serving then runs the same merges over unsplit text, as Mistral does.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(rf"[^\w\s{METASPACE}]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=num_pieces, min_frequency=1, limit_alphabet=128, special_tokens=[], show_progress=False
    )
    trainer_tokenizer.train_from_iterator(corpus_lines(), trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"], key=model["vocab"].__getitem__)
    # Characters sorted by code point so the layout does not hang on the trainer's tie-breaking.
    characters = sorted(piece for piece in by_id if len(piece) == 1)
    pieces = characters + [piece for piece in by_id if len(piece) > 1]
    return pieces, [tuple(merge) for merge in model["merges"]]


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the demo tokenizer with exactly `vocab_size` ids (special, byte and learned tokens).

    Deterministic: the same vocab_size always gives the same tokenizer.json bytes. Raises
    ValueError when the corpus cannot yield enough pieces for `vocab_size`.
    """
    fixed = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    pieces, merges = _learn_pieces(max(vocab_size - fixed, 0))
    characters = sum(len(piece) == 1 for piece in pieces)
    if vocab_size < fixed + characters:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the layout needs {fixed} special and byte tokens "
            f"plus the corpus's {characters} characters"
        )
    if fixed + len(pieces) != vocab_size:
        raise ValueError(
            f"the demo corpus yields only {len(pieces)} BPE pieces, so the demo tokenizer can have at "
            f"most {fixed + len(pieces)} ids; vocab_size {vocab_size} was asked for ({CORPUS_PATH})"
        )
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces))}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos_id = vocab[BOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


@functools.cache
def tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json for `vocab_size`, trained once per process and size."""
    # Training takes about a second, and one process (a test session, a benchmark sweeping sizes)
    # may write several checkpoints with the same vocabulary.
    return train_tokenizer(vocab_size).to_str(pretty=True)


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json for the demo tokenizer (class, special tokens, chat template)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": UNK_TOKEN,
        "use_default_system_prompt": False,
    }


def write_tokenizer_files(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    (out_dir / "tokenizer.json").write_text(tokenizer_json(vocab_size), encoding="utf-8")
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    for name, content in (
        ("tokenizer_config.json", tokenizer_config(model_max_length)),
        ("special_tokens_map.json", special_tokens_map),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
