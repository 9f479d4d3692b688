"""The demo checkpoint: a small random-weight Mixtral in the Hugging Face hub layout.

`checkpoint` writes the weights, config and generation config (and the `mixserve demo-model`
command); `tokenizer` trains the matching Mistral-style byte-fallback BPE tokenizer on the
shipped `corpus.txt`. Every CPU test and the CPU demo serve this checkpoint.
"""
