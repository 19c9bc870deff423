"""DeepSeek-V3 tokenizer (SPEC §4): pre-tokenizer splits, training, round trips, random split,
files that tokenizers and transformers load."""

import json
import random

import numpy as np
import pytest
import tokenizers

from dsv3.config import ModelConfig
from dsv3.data.tokenizer import (BOS_TOKEN, BYTE_TO_CHAR, EOS_TOKEN, PAD_TOKEN, Tokenizer,
                                 build_pre_tokenizer)


def pieces(text, byte_level=False):
    return [p for p, _ in build_pre_tokenizer(byte_level).pre_tokenize_str(text)]


def corpus(n=400, seed=0):
    """Code- and prose-like lines full of punctuation + line breaks, digits and some CJK."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "value", "return", "self", "print", "data"]
    docs = []
    for i in range(n):
        w = rng.sample(words, 3)
        docs.append(f"def {w[0]}_{i}({w[1]}):\n    {w[2]} = [{i}, {i * 37}]\n"
                    f"    return {w[1]}.{w[2]}({w[0]})\n\n"
                    f"# The {w[0]} is {w[1]}. It costs {i * 12345} yen (円).\n"
                    f"これは{w[2]}です。\n{w[1]}, {w[2]}; {w[0]}!\r\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus(), vocab_size=512)


# ---------------------------------------------------------------------------- pre-tokenizer
def test_digits_split_in_groups_of_three():
    assert pieces("12345") == ["123", "45"]
    assert pieces("1234567") == ["123", "456", "7"]
    assert pieces("x=12") == ["x", "=", "12"]


def test_cjk_runs_are_pieces_of_their_own():
    assert pieces("abc中文字テストdef") == ["abc", "中文字テスト", "def"]
    assert "ひらがな" in pieces("かなabc ひらがな")
    assert pieces("中文123") == ["中文", "123"]


def test_punctuation_keeps_its_line_breaks():
    assert pieces("end.\nnext") == ["end", ".\n", "next"]
    assert pieces("f(x)\n\n") == ["f", "(x", ")\n\n"]
    assert pieces("a, b") == ["a", ",", " b"]
    assert pieces("(hello") == ["(hello"]          # punctuation + ASCII letters stick together
    assert pieces("x  \n  y") == ["x", "  \n", " ", " y"]


def test_byte_level_mapping():
    assert pieces("hello world", byte_level=True) == ["hello", "Ġworld"]
    assert set(BYTE_TO_CHAR.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


# ---------------------------------------------------------------------------- training
def test_train_exact_vocab_and_special_ids(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    tiny = ModelConfig.preset("tiny")
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id) == (0, 1, 2)
    assert tok.hf.token_to_id("<|reserved_0|>") == 512 - 8
    # a corpus too small for the merges is padded with reserved tokens up to vocab_size
    small = Tokenizer.train(["hi there.\n"], vocab_size=tiny.vocab_size, num_reserved=2)
    assert small.vocab_size == tiny.vocab_size == small.hf.get_vocab_size(with_added_tokens=True)
    assert small.hf.token_to_id(f"<|reserved_{tiny.vocab_size - 260}|>") == tiny.vocab_size - 1
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)


def test_train_from_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(corpus(50)), encoding="utf-8")
    t = Tokenizer.train(str(path), vocab_size=400)
    assert t.vocab_size == 400 and t.decode(t.encode("return self.x\n")) == "return self.x\n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train(str(tmp_path / "nope.txt"), vocab_size=400)


def test_round_trip_arbitrary_unicode(tok):
    texts = ["", "plain ascii", "héllo wörld\t\r\n", "日本語のテキスト、中文。", "emoji 🙂👍🏽 done",
             "combining e\u0301 and RTL עברית", "nul\x00byte", "  lots   of\n\n\n spaces  ",
             "12345678901234567890", BOS_TOKEN + " literal"]
    rng = random.Random(1)
    for _ in range(30):
        ranges = [(32, 0x250), (0x3000, 0xD7FF), (0x1F300, 0x1FAFF), (10, 11), (13, 14)]
        texts.append("".join(chr(rng.randrange(*rng.choice(ranges)))
                             for _ in range(rng.randrange(1, 60))))
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("abc", add_bos=True)[0] == tok.bos_id


# ---------------------------------------------------------------------------- random split
def test_random_split_round_trips_and_rates(tok):
    is_cand, parts = tok.split_table()
    assert is_cand.sum() > 0
    for i, sub in parts.items():                         # e.g. ".\n" → ".", "\n"
        text = tok.decode([i])
        assert any(c in "\r\n" for c in text) and tok.decode(sub.tolist()) == text
        assert not is_cand[sub].any()
    text = "".join(corpus(20, seed=3))
    ids = tok.encode(text)
    n_cand = int(is_cand[ids].sum())
    assert n_cand > 5
    assert tok.encode(text, split_rate=0.0, rng=0) == ids
    full = tok.encode(text, split_rate=1.0, rng=0)
    assert not is_cand[full].any() and len(full) > len(ids)
    assert tok.decode(full) == text
    half = tok.encode(text, split_rate=0.5, rng=np.random.default_rng(7))
    assert tok.decode(half) == text and len(ids) < len(half) < len(full)
    assert half == tok.encode(text, split_rate=0.5, rng=np.random.default_rng(7))
    r = tok.encode(text, split_rate=0.5, rng=random.Random(7))
    assert tok.decode(r) == text
    arr = tok.random_split(np.asarray(ids), 1.0, 0)
    assert isinstance(arr, np.ndarray) and arr.tolist() == full
    batch = tok.encode_batch([text, text], split_rate=1.0, rng=0)
    assert batch == [full, full]


# ---------------------------------------------------------------------------- files
def test_save_loads_with_tokenizers_and_from_file(tok, tmp_path):
    tok.save(tmp_path / "tk")
    text = "return self.alpha(beta)\n\n中文 12345 🙂"
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tk" / "tokenizer.json"))
    assert plain.encode(text, add_special_tokens=False).ids == tok.encode(text)
    cfg = json.loads((tmp_path / "tk" / "tokenizer_config.json").read_text(encoding="utf-8"))
    names = (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"])
    assert names == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    for path in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        again = Tokenizer.from_file(path)
        assert again.fingerprint() == tok.fingerprint() and again.encode(text) == tok.encode(text)
        assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (0, 1, 2, 512)
    tok.save(tmp_path / "single.json")
    assert Tokenizer.from_file(tmp_path / "single.json").encode(text) == tok.encode(text)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_file(tmp_path / "missing")



def test_special_token_named_but_not_in_the_vocabulary_is_refused(tok, tmp_path):
    """tokenizer_config.json naming an eos/bos/pad token the vocabulary lacks was read as "no such token":
    a model whose eos is missing generates to the length limit without a word."""
    tok.save(tmp_path / "tk")
    path = tmp_path / "tk" / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("eos_token", "bos_token"):
        path.write_text(json.dumps(dict(cfg, **{key: {"content": "<|im_end|>"}})), encoding="utf-8")
        with pytest.raises(ValueError, match=f"{key} '<\\|im_end\\|>' is not in .*vocabulary"):
            Tokenizer.from_file(tmp_path / "tk")
    path.write_text(json.dumps(dict(cfg, eos_token=None)), encoding="utf-8")     # none named: fine
    assert Tokenizer.from_file(tmp_path / "tk").eos_id is None


def test_transformers_loads_saved_dir(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tk")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    text = "print(alpha).\nこれは 2024 年"
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text, add_bos=True)          # bos added like DeepSeek's tokenizer
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_text_prompts_start_with_bos_exactly_when_transformers_adds_it(tok, tmp_path):
    """``add_bos_token`` (whether served text prompts start with bos) as transformers encodes the same
    directory: by the tokenizer.json's post-processor (ours adds bos), whatever tokenizer_config.json says;
    without one, by the config. A prepared dataset's directory says it too."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    def saved(name, post_processor=True, **config):
        d = tmp_path / name
        d.mkdir()
        hf = HFTokenizer.from_str(tok.hf.to_str())
        if not post_processor:
            hf.post_processor = None
        hf.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
             "pad_token": PAD_TOKEN, **config}), encoding="utf-8")
        return d

    for d in (saved("unsaid"), saved("said_true", add_bos_token=True), saved("said_false", add_bos_token=False),
              saved("no_post", post_processor=False)):
        ours = Tokenizer.from_file(d)
        theirs = transformers.AutoTokenizer.from_pretrained(str(d))("print(x)")["input_ids"]
        assert ours.add_bos_token == (theirs[0] == ours.bos_id), d.name
    assert Tokenizer.from_file(saved("no_post_said", post_processor=False, add_bos_token=True)).add_bos_token

    from dsv3.data.dataset import prepare
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(corpus(40)):
        (src / f"{i}.py").write_text(doc, encoding="utf-8")
    prepare(str(src), tmp_path / "data", tok, val_fraction=0.1, progress=False)
    assert Tokenizer.from_file(tmp_path / "data").add_bos_token is True
