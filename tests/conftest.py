import pytest

from lilllm.data import load_text, prepare


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A character-level dataset of the first 30,000 characters (27,000 train, 3,000 val),
    for training runs that take a few steps."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "small.txt").write_text(load_text()[:30_000])
    prepare("char", None, [folder / "small.txt"], folder / "prepared")
    return folder / "prepared"
