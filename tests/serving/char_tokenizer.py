"""A 64-token character tokenizer for the tiny llama (vocab 64), built in code: no download.

ids 0 <pad>, 1 <s>, 2 <unk>, then space, a-z, A-Z, 0-7 one character each; no EOS (so the tiny
model always generates ``max_tokens``, as ``generate`` without an EOS does); a one-line chat template.
"""
from __future__ import annotations

import string

CHARS = " " + string.ascii_lowercase + string.ascii_uppercase + "01234567"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(CHARS)})
    assert len(vocab) == 64
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok
