"""Checkpoints carry their tokenizer, so loading a model needs nothing else (data/ may be
gone); every bad checkpoint is refused in one line, and a refused load touches no file."""

import json
import shutil

import pytest
import torch

from lilllm import LilllmError
from lilllm.checkpoint import load_checkpoint, load_model, save_checkpoint
from lilllm.cli import main as cli_main
from lilllm.config import ModelConfig
from lilllm.model import GPT
from lilllm.tokenizer import CharTokenizer
from lilllm.train import make_config, train

TOKENIZER = CharTokenizer.train("abcdefghij \n")


def small_model(**changes):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=16, d_model=16, n_layers=1, n_heads=2,
                           **changes))


def test_a_checkpoint_round_trips_the_model_and_its_tokenizer(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path / "m.pt", model, TOKENIZER, step=7)
    loaded, tokenizer, state = load_model(tmp_path / "m.pt", "cpu")
    assert tokenizer.fingerprint == TOKENIZER.fingerprint and tokenizer.encode("abc\n") == TOKENIZER.encode("abc\n")
    assert state["step"] == 7 and not loaded.training
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def edited(tmp_path, change):
    """A checkpoint of small_model() with `change(state)` applied; returns its path and bytes."""
    save_checkpoint(tmp_path / "m.pt", small_model(), TOKENIZER)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "bad.pt")
    return tmp_path / "bad.pt", (tmp_path / "bad.pt").read_bytes()


def bigger_config(state):
    state["model_config"] = json.dumps({**json.loads(state["model_config"]), "d_model": 32})


def missing_weight(state):
    del state["model"]["norm.weight"]


def nan_config(state):
    state["model_config"] = json.dumps({**json.loads(state["model_config"]), "rope_base": float("nan")})


def other_tokenizer(state):
    state["tokenizer"] = json.dumps(CharTokenizer.train("xyz").to_dict())


def forged_tokenizer(state):
    state["tokenizer"] = json.dumps({**json.loads(state["tokenizer"]), "chars": "abcdefghij \nk"})


@pytest.mark.parametrize("change, match", [
    (bigger_config, "the weights do not match the stored model config"),
    (missing_weight, "the weights do not match the stored model config .*Missing key"),
    (lambda state: state.pop("tokenizer"), "lacks tokenizer: it is incomplete"),
    (lambda state: state.pop("model_config"), "lacks model_config"),
    (nan_config, "holds a bad model config: rope_base=nan is not a finite number"),
    (lambda state: state.update(model_config="{not json"), "holds a bad model config"),
    (other_tokenizer, "is inconsistent: its tokenizer has 11 tokens, its model config 20"),
    (forged_tokenizer, "does not match its fingerprint"),
    (lambda state: state.update(format="lilllm-checkpoint-1"), "older lilllm \\(format 1, without its tokenizer\\): "
                                                                "train it again"),
    (lambda state: state.update(format="something else"), "is not a lilllm checkpoint"),
])
def test_a_bad_checkpoint_is_refused_in_one_line_and_left_alone(tmp_path, change, match):
    path, before = edited(tmp_path, change)
    with pytest.raises(LilllmError, match=match) as caught:
        load_model(path, "cpu")
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before


def test_a_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.pt", small_model(), TOKENIZER)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:500])
    with pytest.raises(LilllmError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")


def test_the_cli_answers_a_bad_checkpoint_with_exit_2(tmp_path, capsys):
    path, before = edited(tmp_path, bigger_config)
    assert cli_main(["sample", str(path), "--prompt", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1 and "Traceback" not in err
    assert path.read_bytes() == before


def test_sample_and_chat_need_no_data_folder(small_data, tmp_path, capsys, monkeypatch):
    """Train on a copy of the token files, delete the copy: the checkpoint still samples."""
    import io

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    config = make_config("tiny", [f"--data-dir={data}", f"--out-dir={tmp_path / 'run'}", "--steps=2",
                                  "--model.d-model=32", "--model.n-layers=1", "--model.n-heads=2",
                                  "--model.n-kv-heads=1", "--model.block-size=16", "--batch-size=2",
                                  "--warmup=1", "--eval-interval=0"])
    train(config, progress=False)
    shutil.rmtree(data)
    checkpoint = str(tmp_path / "run" / "best.pt")
    assert cli_main(["sample", checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("Who goes there?\n"))
    assert cli_main(["chat", checkpoint, "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert "assistant: " in capsys.readouterr().out
    assert cli_main(["eval", checkpoint]) == 2  # scoring needs the token files, and says so
    assert "is missing" in capsys.readouterr().err
