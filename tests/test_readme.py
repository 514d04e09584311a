"""The README's real-use commands on one run (create, resume, change budgets, export), run as written
with the paths pointed at a tiny checkpoint and its data."""
import json
import os
import re
import shlex


from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def real_use_commands():
    text = open(README).read()
    block = text.split("## Real use", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("fuyou ")]


def test_the_readme_lists_the_run1_chain():
    run1 = [c for c in real_use_commands() if "/nvme/run1" in c]
    assert len(run1) == 5 and "--resume" not in run1[0] and all("--resume" in c for c in run1[1:4]) and run1[4].startswith("fuyou export")


def test_the_readmes_commands_on_one_run_work_as_written(tmp_path):
    ckpt = save_checkpoint(str(tmp_path / "my-hf-model"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Document {i}. " + "A sentence about a fox and a dog. " * 20}) for i in range(200)))
    store, out = str(tmp_path / "run1"), str(tmp_path / "my-finetuned-model")
    subst = {"./my-hf-model": ckpt, "train.jsonl": str(data), "/nvme/run1": store, "./my-finetuned-model": out}
    for command in [c for c in real_use_commands() if "/nvme/run1" in c]:
        argv = [subst.get(w, w) for w in shlex.split(command)[1:]]
        assert main(argv + (["--device", "cpu"] if argv[0] == "finetune" else [])) == 0, command
        if argv[0] == "finetune":
            target = int(argv[argv.index("--steps") + 1])
            assert json.load(open(os.path.join(store, "manifest.json")))["step"] == target, command
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
