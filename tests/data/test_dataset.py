"""Data: packing of text, prompt/completion masking, .txt files, seeded resumable order, errors."""
import json

import pytest
import torch

from fuyou.data.dataset import TokenDataset
from fuyou.data.tokenizer import DEFAULT_TOKENIZER_DIR, DataError, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_TOKENIZER_DIR)


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) for x in lines) if name.endswith(".jsonl") else lines)
    return str(p)


def test_text_is_packed_without_padding(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [{"text": "One plus two is three."}] * 30)
    ds = TokenDataset(path, tok, seq_len=16)
    assert ds.attention_mask is None and ds.input_ids.shape[1] == 16
    assert torch.equal(ds.input_ids, ds.labels)
    assert int((ds.input_ids == tok.eos_token_id).sum()) > 0  # documents end with EOS


def test_prompt_completion_masks_prompt_and_padding(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [{"prompt": "Two plus two is", "completion": " four."}])
    ds = TokenDataset(path, tok, seq_len=24)
    b = ds.batch(0, 1)
    n_prompt = len(tok("Two plus two is", add_special_tokens=False)["input_ids"])
    n_comp = len(tok(" four.", add_special_tokens=False)["input_ids"]) + 1
    assert bool((b.labels[0, :n_prompt] == -100).all())
    assert torch.equal(b.labels[0, n_prompt : n_prompt + n_comp], b.input_ids[0, n_prompt : n_prompt + n_comp])
    assert bool((b.labels[0, n_prompt + n_comp :] == -100).all())
    assert b.attention_mask is not None and int(b.attention_mask.sum()) == n_prompt + n_comp


def test_txt_file(tmp_path, tok):
    path = write(tmp_path, "d.txt", "\n\n".join(["Counting up: one, two, three."] * 20))
    assert len(TokenDataset(path, tok, seq_len=8)) > 0


def test_order_is_seeded_and_resumable(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [{"text": f"Number {i} is here."} for i in range(50)])
    a, b = TokenDataset(path, tok, 8, seed=1), TokenDataset(path, tok, 8, seed=1)
    whole = a.batch(0, 6).input_ids
    resumed = torch.cat([b.batch(0, 2).input_ids, b.batch(2, 4).input_ids])
    assert torch.equal(whole, resumed)
    assert not torch.equal(TokenDataset(path, tok, 8, seed=2).batch(0, 6).input_ids, whole)
    # Past one epoch the order wraps into the next permutation.
    assert a.batch(len(a) - 1, 3).input_ids.shape[0] == 3


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("x.csv", "a,b", "unsupported extension"),
        ("x.jsonl", [{"foo": 1}], '"text"'),
        ("x.jsonl", [], "no examples"),
        ("x.jsonl", [{"text": "hi"}], "fewer than"),
    ],
)
def test_errors(tmp_path, tok, name, content, match):
    path = write(tmp_path, name, content) if name.endswith(".jsonl") else str(tmp_path / name)
    if not name.endswith(".jsonl"):
        open(path, "w").write(content)
    with pytest.raises(DataError, match=match):
        TokenDataset(path, tok, seq_len=64)
