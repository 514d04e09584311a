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


def config_file_section():
    text = open(README).read().split("## A fine-tune from a config file", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    toml = block.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    rest = block.split("\nEOF\n", 1)[1]
    command = next(line.split("#")[0].strip() for line in rest.splitlines() if line.startswith("fuyou "))
    script = rest.split('python -c "', 1)[1].rsplit('"', 1)[0]
    return toml, command, script


def test_the_readmes_config_file_run_works_as_written(tmp_path, monkeypatch):
    import subprocess
    import sys

    toml, command, script = config_file_section()
    save_checkpoint(str(tmp_path / "my-hf-model"), tiny_config("llama", vocab_size=640))
    for name, n in (("train.jsonl", 200), ("valid.jsonl", 20)):
        (tmp_path / name).write_text("\n".join(json.dumps({"text": f"{name} {i}. " + "The fox and the dog. " * 25}) for i in range(n)))
    monkeypatch.chdir(tmp_path)  # the file's relative paths are the README's
    (tmp_path / "run.toml").write_text(toml.replace("/nvme/run7", str(tmp_path / "run7")))
    assert main(shlex.split(command)[1:] + ["--device", "cpu"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run7" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_loss" in r] == [50, 100, 150, 200]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-100", "checkpoint-200"]
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("The fox"), proc.stderr[-2000:]


def lora_commands():
    text = open(README).read().split("## LoRA on a streamed frozen base", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith("fuyou ")]


def test_the_readmes_lora_commands_work_as_written(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    commands = lora_commands()
    assert len(commands) == 5 and commands[-1].startswith("fuyou plan --model llama-70b --peft lora")
    ckpt = save_checkpoint(str(tmp_path / "my-hf-model"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Document {i}. " + "A sentence about a fox and a dog. " * 20}) for i in range(200)))
    subst = {"./my-hf-model": ckpt, "train.jsonl": str(data), "/nvme/base-bf16": str(tmp_path / "base"), "./lora-run1": str(tmp_path / "run"),
             "./my-adapter": str(tmp_path / "adapter"), "./my-merged-model": str(tmp_path / "merged")}
    for command in commands:
        argv = [subst.get(w, w) for w in shlex.split(command)[1:]]
        assert main(argv + (["--device", "cpu"] if argv[0] == "finetune" else [])) == 0, command
    assert json.load(open(tmp_path / "run" / "manifest.json"))["step"] == 200
    ids = torch.randint(0, 640, (1, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        # The base store keeps bf16 weights: the adapter on the bf16-rounded base is what was trained.
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def data_parallel_commands():
    text = open(README).read().split("## Data parallel over several processes", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip().startswith(("fuyou ", "torchrun "))]


def test_the_readmes_data_parallel_commands_work_as_written(tmp_path):
    import subprocess
    import sys

    commands = data_parallel_commands()
    assert [c.split()[0] for c in commands] == ["torchrun", "torchrun", "fuyou", "fuyou"]
    ckpt = save_checkpoint(str(tmp_path / "my-hf-model"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Document {i}. " + "A sentence about a fox and a dog. " * 20}) for i in range(200)))
    stores = str(tmp_path / "dp{rank}")
    subst = {"./my-hf-model": ckpt, "train.jsonl": str(data), "/nvme/dp{rank}": stores, "./my-dp-model": str(tmp_path / "out")}
    root = os.path.dirname(README)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for command in commands:
        words = [subst.get(w, w) for w in shlex.split(command)]
        if words[0] == "torchrun":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            proc = subprocess.run(launcher + words[1:] + ["--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
            target = int(words[words.index("--steps") + 1])
            assert [json.load(open(os.path.join(stores.format(rank=r), "manifest.json")))["step"] for r in (0, 1)] == [target, target], command
        else:
            assert main(words[1:]) == 0, command
    assert os.path.isfile(os.path.join(str(tmp_path / "out"), "model.safetensors.index.json"))
