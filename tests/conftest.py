import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared token directory (400 KB of stdlib sources, 2048-id tokenizer), shared by the
    training tests."""
    from dsv3.data import iter_documents, prepare

    root = tmp_path_factory.mktemp("corpus")
    for i, d in enumerate(iter_documents("builtin", max_bytes=400_000)):
        (root / f"doc{i:04d}.txt").write_text(d)
    out = tmp_path_factory.mktemp("tokens")
    prepare(str(root), str(out), vocab_size=2048, progress=False, val_fraction=0.1)
    return str(out)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny matrices: faster, and immune to a busy shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, data_dir):
    """A small random model saved in the HF layout with the corpus tokenizer (for generate / serve)."""
    from helpers import save_corpus_model

    return save_corpus_model(tmp_path_factory.mktemp("gen_model"), data_dir, max_positions=128)
