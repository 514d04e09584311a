"""A crafted store cannot reach outside itself: symlinks, names that climb out, malformed manifests and
absurd sizes are each refused with one line and exit 2, before any file outside the store is read,
written or deleted (a sentinel directory beside the store is compared before and after)."""
import hashlib
import json
import os
import shutil

import pytest

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crafted")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}: one two three four five six seven"}) for i in range(40)))
    store = str(tmp / "store")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--store", store, "--steps", "1", "--batch-size", "2", "--micro-batches", "1",
                 "--seq-len", "16", "--device", "cpu"]) == 0
    return store


def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
    return out


def _manifest_edit(fn):
    def craft(store, _sentinel):
        path = os.path.join(store, "manifest.json")
        m = json.load(open(path))
        fn(m)
        json.dump(m, open(path, "w"))
    return craft


def _link_dir(name):
    def craft(store, sentinel):
        target = os.path.join(sentinel, name)
        shutil.copytree(os.path.join(store, name), target) if os.path.isdir(os.path.join(store, name)) else os.makedirs(target)
        open(os.path.join(target, "keep-me.txt"), "w").write("not the store's")
        shutil.rmtree(os.path.join(store, name), ignore_errors=True)
        os.symlink(target, os.path.join(store, name))
    return craft


def _link_file(sub):
    def craft(store, sentinel):
        d = os.path.join(store, sub)
        victim = sorted(os.listdir(d))[0]
        outside = os.path.join(sentinel, "outside-" + victim)
        shutil.copyfile(os.path.join(d, victim), outside)
        os.unlink(os.path.join(d, victim))
        os.symlink(outside, os.path.join(d, victim))
    return craft


def _first_param(m):
    return m["blocks"][1]["params"][0]


CRAFTS = {
    "blocks is a symlink": _link_dir("blocks"),
    "journal is a symlink": _link_dir("journal"),
    "model is a symlink": _link_dir("model"),
    "a model file is a symlink": _link_file("model"),
    "a block file is a symlink": _link_file("blocks"),
    "a block named ..": _manifest_edit(lambda m: m["blocks"][1].update(name="../../sentinel")),
    "an absolute block name": _manifest_edit(lambda m: m["blocks"][1].update(name="/tmp/x")),
    "a negative version": _manifest_edit(lambda m: m["blocks"][1]["versions"].update(master=-1)),
    "a version that is text": _manifest_edit(lambda m: m["blocks"][1]["versions"].update(master="1")),
    "a version after the step": _manifest_edit(lambda m: m["blocks"][1]["versions"].update(master=99)),
    "a kind named ..": _manifest_edit(lambda m: m["blocks"][1]["versions"].update({"../x": 1})),
    "an extra top-level key": _manifest_edit(lambda m: m.update(extra=1)),
    "an extra block key": _manifest_edit(lambda m: m["blocks"][1].update(extra=1)),
    "an extra parameter key": _manifest_edit(lambda m: _first_param(m).update(extra=1)),
    "a step that is text": _manifest_edit(lambda m: m.update(step="1")),
    "numel beyond any tensor": _manifest_edit(lambda m: _first_param(m).update(shape=[1 << 21, 1 << 20], numel=1 << 41)),
    "a huge numel matching its shape": _manifest_edit(lambda m: _first_param(m).update(shape=[1 << 19, 1 << 19], numel=1 << 38)),
    "numel not matching the shape": _manifest_edit(lambda m: _first_param(m).update(numel=_first_param(m)["numel"] + 1)),
    "a missing block file": lambda store, _s: os.unlink(os.path.join(store, "blocks", sorted(os.listdir(os.path.join(store, "blocks")))[0])),
    "not JSON": lambda store, _s: open(os.path.join(store, "manifest.json"), "w").write("{"),
}


@pytest.mark.parametrize("what", list(CRAFTS))
def test_a_crafted_store_is_refused_in_one_line_touching_nothing_outside(good_store, tmp_path, capsys, what):
    store, sentinel, out = str(tmp_path / "store"), str(tmp_path / "sentinel"), str(tmp_path / "export")
    shutil.copytree(good_store, store, symlinks=True)
    os.makedirs(sentinel)
    open(os.path.join(sentinel, "precious.txt"), "w").write("must survive")
    CRAFTS[what](store, sentinel)
    before = _snapshot(sentinel)
    for argv in (["finetune", "--store", store, "--resume", "--steps", "2"], ["export", "--store", store, "--to", out]):
        capsys.readouterr()
        assert main(argv) == 2, (what, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fuyou: error: "), (what, err)
        assert _snapshot(sentinel) == before, what
        assert not os.path.exists(out)
        assert not any(n.startswith("export.partial") for n in os.listdir(tmp_path))


def test_export_leaves_an_unrelated_partial_directory_alone(good_store, tmp_path):
    out = str(tmp_path / "ckpt")
    os.makedirs(out + ".partial")
    open(os.path.join(out + ".partial", "mine.txt"), "w").write("someone else's")
    assert main(["export", "--store", good_store, "--to", out]) == 0
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert open(os.path.join(out + ".partial", "mine.txt")).read() == "someone else's"


def test_a_missing_block_file_is_named_as_damage(good_store, tmp_path, capsys):
    store = str(tmp_path / "store")
    shutil.copytree(good_store, store)
    victim = sorted(f for f in os.listdir(os.path.join(store, "blocks")) if ".master." in f)[0]
    os.unlink(os.path.join(store, "blocks", victim))
    capsys.readouterr()
    assert main(["finetune", "--store", store, "--resume", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "is damaged (missing blocks/" + victim in err and "check the disk" not in err
