"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own converter, for `bench compare`.

Run as a script, in its own process (the converter imports torch and patches nothing outside it):
`python -m benchmarks.llamacpp_gguf CONVERTER MODEL_DIR OUT_FILE DTYPE`, CONVERTER being llama.cpp's
`convert_hf_to_gguf.py`. Two adjustments make its output tokenize as the checkpoint's own tokenizer does:

- A Llama/Mistral-style `tokenizer.json` (byte-fallback BPE, no `tokenizer.model`) is read by the
  converter's `LlamaHfVocab`, but only after its SentencePiece path gave up, which it does on a missing
  `tokenizer.model` only when the `sentencepiece` package imports. Without that package the SentencePiece
  path is skipped here directly.
- `LlamaHfVocab` gives every token the same score (-1000). llama.cpp's SPM tokenizer merges the pair
  whose merged token scores highest, so with equal scores it splits text differently from the Hugging
  Face BPE (1 of 60 benchmark prompts identical). Each token is scored instead by the rank of the merge
  that creates it, negated (earlier merges first, as BPE applies them): 60 of 60 identical.
"""

import json
import runpy
import sys
from pathlib import Path

# Tokens no merge creates (single characters, byte pieces, specials): below every merged token.
UNMERGED_SCORE = -1e9


def merge_scores(tokenizer_json: Path) -> dict[str, float]:
    """Score of each token a merge creates: minus the merge's rank."""
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def convert(converter: Path, model_dir: Path, out_file: Path, dtype: str) -> None:
    """Write `out_file` (GGUF, weights in `dtype`) from `model_dir` with the adjustments above."""
    sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
    import gguf
    from conversion import base

    tokenizer_json = model_dir / "tokenizer.json"
    if not (model_dir / "tokenizer.model").exists() and tokenizer_json.exists():

        def no_sentencepiece(self, add_to_gguf: bool = True) -> None:
            raise FileNotFoundError(f"no tokenizer.model in {model_dir}")

        base.TextModel._set_vocab_sentencepiece = no_sentencepiece
        scores = merge_scores(tokenizer_json)
        vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
        text_of = {index: text for text, index in vocab.items()}

        def merge_rank_score(self, token_id: int) -> float:
            return scores.get(text_of.get(token_id, ""), UNMERGED_SCORE)

        gguf.LlamaHfVocab.get_token_score = merge_rank_score
    sys.argv = [str(converter), str(model_dir), "--outfile", str(out_file), "--outtype", dtype]
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m benchmarks.llamacpp_gguf CONVERTER MODEL_DIR OUT_FILE DTYPE")
    convert(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
