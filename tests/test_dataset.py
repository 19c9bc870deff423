"""Token shards and the random-access loader (SPEC §5): prepare, determinism, splits, errors,
fsspec URLs."""

import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import torch

from dsv3.data import Tokenizer, TokenDataset, is_val, iter_documents, prepare, resolve_files

N_FILES, N_JSONL = 24, 16


def make_docs():
    files = {f"f{i:02d}.txt": f"Document {i}: the value is {i * 7}.\nend of doc {i}.\n"
             * (3 + i % 5) for i in range(N_FILES)}
    lines = [{"text": f"json doc {i}, {'x' * i}!\n\nmore {i}.", "id": i} for i in range(N_JSONL)]
    return files, lines


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files, lines = make_docs()
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "z.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n",
                                          encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def tok(corpus_dir):
    return Tokenizer.train(iter_documents(str(corpus_dir)), vocab_size=400)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    index = prepare(str(corpus_dir), out, tok, val_fraction=0.1, shard_tokens=700,
                    split_rate=0.5, seed=3, progress=False)
    return out, index


def expected_docs():
    files, lines = make_docs()
    return [files[k] for k in sorted(files)] + [x["text"] for x in lines]


def split_docs(tok, tokens):
    """Decode a split's tokens back into its documents (each ends with eos)."""
    ids = tokens.tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur
    return docs


def test_index_and_shards(prepared, tok):
    out, index = prepared
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == index
    assert index["dtype"] == "uint16" and index["vocab_size"] == 400
    assert index["tokenizer_sha256"] == tok.fingerprint()
    train = index["splits"]["train"]
    assert len(train["shards"]) > 1 and all(s["tokens"] == 700 for s in train["shards"][:-1])
    for split in ("train", "val"):
        files = index["splits"][split]["shards"]
        sizes = [os.path.getsize(out / s["file"]) for s in files]
        assert sizes == [2 * s["tokens"] for s in files]
    assert Tokenizer.from_file(out).fingerprint() == tok.fingerprint()


def test_documents_round_trip_and_val_is_disjoint(prepared, tok):
    out, index = prepared
    docs = expected_docs()
    want_val = [d for i, d in enumerate(docs) if is_val(i, 0.1)]
    want_train = [d for i, d in enumerate(docs) if not is_val(i, 0.1)]
    assert len(want_val) == len(docs) // 10 > 0
    train = TokenDataset(out, "train", seq_len=8)
    val = TokenDataset(out, "val", seq_len=8)
    # the random split changes tokens, never text; eos after every document
    assert split_docs(tok, train.read(0, train.num_tokens)) == want_train
    assert split_docs(tok, val.read(0, val.num_tokens)) == want_val
    assert not set(want_val) & set(want_train)
    assert index["splits"]["val"]["documents"] == len(want_val)
    # validation documents are not split, training ones are (split_rate=0.5)
    val_plain = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in want_val])
    assert np.array_equal(val.read(0, val.num_tokens), val_plain)
    train_plain = sum(len(tok.encode(d)) + 1 for d in want_train)
    assert train.num_tokens > train_plain


def test_split_rate_zero_and_one(corpus_dir, tok, tmp_path):
    n = {}
    for rate in (0.0, 1.0):
        index = prepare(str(corpus_dir), tmp_path / str(rate), tok, split_rate=rate,
                        val_fraction=0.0, progress=False)
        n[rate] = index["splits"]["train"]["tokens"]
        ds = TokenDataset(tmp_path / str(rate), "train", seq_len=4)
        is_cand, _ = tok.split_table()
        assert is_cand[ds.read(0, ds.num_tokens)].any() == (rate == 0.0)
    assert n[0.0] == sum(len(tok.encode(d)) + 1 for d in expected_docs()) < n[1.0]


def test_batches_are_a_function_of_seed_and_step(prepared):
    out, _ = prepared
    ds = TokenDataset(out, "train", seq_len=16)
    x, y = ds.batch(5, 4, seed=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    x2, y2 = TokenDataset(out, "train", seq_len=16).batch(5, 4, seed=1)   # e.g. after a resume
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, ds.batch(6, 4, seed=1)[0])
    assert not torch.equal(x, ds.batch(5, 4, seed=2)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])                          # targets shifted by one
    starts = ds.window_starts(5, 4, seed=1)
    for row, s in zip(range(4), starts):
        assert torch.equal(x[row], torch.from_numpy(ds.read(int(s), 16)))
        assert torch.equal(y[row], torch.from_numpy(ds.read(int(s) + 1, 16)))
    # data parallel: each rank takes its slice of the same global batch
    g = ds.windows(5, 4, seed=1, world_size=1)
    both = [ds.windows(5, 2, seed=1, world_size=2, rank=r) for r in (0, 1)]
    assert torch.equal(torch.cat(both), g)
    assert x.max() < ds.vocab_size


def test_extra_tokens_for_mtp(prepared):
    out, _ = prepared
    ds = TokenDataset(out, "train", seq_len=16)
    x, y = ds.batch(0, 3, seed=0, extra=2)
    assert x.shape == y.shape == (3, 18)
    w = ds.windows(0, 3, seed=0, extra=2)
    assert w.shape == (3, 19) and torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])


def test_reads_cross_shard_boundaries(prepared):
    out, index = prepared
    ds = TokenDataset(out, "train", seq_len=4)
    raw = np.concatenate([np.fromfile(out / s["file"], dtype="<u2")
                          for s in index["splits"]["train"]["shards"]])
    assert np.array_equal(ds.read(0, len(raw)), raw.astype(np.int64))
    assert np.array_equal(ds.read(695, 10), raw[695:705])


def test_val_batches_deterministic(prepared):
    out, _ = prepared
    val = TokenDataset(out, "val", seq_len=8)
    a = list(val.val_batches(batch_size=3))
    b = list(val.val_batches(batch_size=3))
    assert len(a) == len(b) > 0 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    xs = torch.cat([x for x, _ in a])
    assert torch.equal(xs[0], torch.from_numpy(val.read(0, 8)))
    assert torch.equal(xs[1], torch.from_numpy(val.read(8, 8)))      # stride seq_len
    assert (xs.shape[0] - 1) * 8 + 9 <= val.num_tokens
    assert len(list(val.val_batches(batch_size=1, max_batches=2))) == 2


def test_errors(tmp_path, tok, prepared):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        prepare(str(missing), tmp_path / "o", tok, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing"):
        prepare(str(tmp_path / "nothing*.txt"), tmp_path / "o", tok, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(str(empty), tmp_path / "o", tok, progress=False)
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(str(empty), tmp_path / "o", tok, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prepare(str(bad), tmp_path / "o", tok, progress=False)
    out, index = prepared
    too_long = index["splits"]["val"]["tokens"]
    with pytest.raises(ValueError, match="exceeds"):
        TokenDataset(out, "val", seq_len=too_long)
    ds = TokenDataset(out, "val", seq_len=too_long - 1)
    with pytest.raises(ValueError, match="exceeds"):
        ds.batch(0, 1, extra=1)
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenDataset(tmp_path, "train", seq_len=4)
    with pytest.raises(ValueError, match="split"):
        TokenDataset(out, "test", seq_len=4)
    other = Tokenizer.train(["something else entirely.\n"] * 5, vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenDataset(out, "train", seq_len=4, tokenizer=other)


def test_fsspec_memory_filesystem(prepared, corpus_dir, tok):
    out, index = prepared
    fs = fsspec.filesystem("memory")
    url = f"memory://dsv3-test-{uuid.uuid4().hex}"
    try:
        # reading side: a prepared directory uploaded to memory://
        for name in ["index.json"] + [s["file"] for sp in index["splits"].values()
                                      for s in sp["shards"]]:
            with fs.open(f"{url}/read/{name}", "wb") as f:
                f.write((out / name).read_bytes())
        local = TokenDataset(out, "train", seq_len=16)
        remote = TokenDataset(f"{url}/read", "train", seq_len=16)
        assert remote.num_tokens == local.num_tokens and not remote._local
        for step in range(3):
            assert torch.equal(remote.batch(step, 4, seed=9)[0], local.batch(step, 4, seed=9)[0])
        # writing side: prepare straight into memory://, same shards
        prepare(str(corpus_dir), f"{url}/written", tok, val_fraction=0.1, shard_tokens=700,
                split_rate=0.5, seed=3, progress=False)
        written = TokenDataset(f"{url}/written", "val", seq_len=8)
        assert np.array_equal(written.read(0, written.num_tokens),
                              TokenDataset(out, "val", seq_len=8).read(0, written.num_tokens))
    finally:
        fs.rm(url.replace("memory://", "/"), recursive=True)


def test_builtin_corpus_and_training_a_tokenizer(tmp_path):
    files = resolve_files("builtin")
    paths = [p for _, p in files]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p for p in paths)
    docs = list(iter_documents(None, max_bytes=30_000))
    assert 0 < sum(len(d.encode()) for d in docs) < 30_000 + max(len(d.encode()) for d in docs)
    index = prepare("builtin", tmp_path / "b", None, vocab_size=300, max_bytes=30_000,
                    progress=False)
    assert index["vocab_size"] == 300 and index["splits"]["train"]["tokens"] > 1000
    assert index["source"].startswith("builtin")
    saved = Tokenizer.from_file(tmp_path / "b")
    ds = TokenDataset(tmp_path / "b", "train", seq_len=32, tokenizer=saved)
    x, _ = ds.batch(0, 2)
    assert x.shape == (2, 32)


def test_doc_bytes_cuts_files_into_pieces_at_line_boundaries(corpus_dir, tok, tmp_path):
    from dsv3.data.dataset import split_document

    text = "".join(f"line {i} {'é' * (i % 7)}\n" for i in range(200))
    pieces = split_document(text, 300)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(p.endswith("\n") for p in pieces) and all(len(p.encode()) < 300 + 30 for p in pieces)
    assert split_document(text, None) == [text] and split_document("short", 300) == ["short"]
    whole = list(iter_documents(str(corpus_dir)))
    cut = list(iter_documents(str(corpus_dir), doc_bytes=64))
    assert "".join(cut) == "".join(whole) and len(cut) > len(whole)
    index = prepare(str(corpus_dir), tmp_path / "cut", tok, val_fraction=0.2, doc_bytes=64, progress=False)
    assert index["doc_bytes"] == 64 and index["splits"]["val"]["documents"] == int(len(cut) * 0.2)
    with pytest.raises(ValueError, match="doc_bytes"):
        prepare(str(corpus_dir), tmp_path / "bad", tok, doc_bytes=0, progress=False)
