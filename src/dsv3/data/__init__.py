"""Data: DeepSeek-V3's byte-level BPE tokenizer (SPEC §4) and token shards read at random
offsets, the 3FS data-loading pattern (SPEC §5).

    tok = Tokenizer.train(iter_documents("builtin"), vocab_size=2048)
    prepare("builtin", "data/stdlib", tok)             # or tokenizer=None: train one first
    ds = TokenDataset("data/stdlib", "train", seq_len=256)
    inputs, targets = ds.batch(step, batch_size=8, seed=0)
"""

from .dataset import (BUILTIN, BUILTIN_MAX_BYTES, TokenDataset, is_val, iter_documents,
                      prepare, resolve_files)
from .tokenizer import (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer, build_pre_tokenizer)

__all__ = ["Tokenizer", "build_pre_tokenizer", "BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN",
           "prepare", "TokenDataset", "iter_documents", "resolve_files", "is_val", "BUILTIN",
           "BUILTIN_MAX_BYTES"]
