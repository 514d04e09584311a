"""Regenerates fuyou's bundled default corpus and tokenizer (fuyou/data/default_*).

    python tools/make_default_data.py

The corpus is synthetic and deterministic: short English documents about counting, arithmetic,
the calendar and small stories, with enough regularity that a small model's loss falls quickly and
visibly within the default run. The tokenizer is a byte-level BPE trained on it (vocab 2048).
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fuyou", "data")
NUMS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
NAMES = "Ann Tom Mia Leo Sara Ben Ivy Max Zoe Sam Eva Noah Lily Omar Ruth Paul".split()
THINGS = "apples pears books coins cards shells stones cups pens keys boats kites".split()
PLACES = ["the park", "the market", "the river", "the school", "the library", "the garden", "the hill", "the harbour"]
COLORS = "red blue green yellow white black brown orange".split()


def arithmetic(r):
    a, b = r.randint(0, 10), r.randint(0, 10)
    if r.random() < 0.5:
        return f"{NUMS[a].capitalize()} plus {NUMS[b]} is {NUMS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"{NUMS[a].capitalize()} minus {NUMS[b]} is {NUMS[a - b]}."


def calendar(r):
    i = r.randrange(7)
    j = r.randrange(12)
    return r.choice([
        f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.",
        f"The day before {DAYS[i]} is {DAYS[(i - 1) % 7]}.",
        f"The month after {MONTHS[j]} is {MONTHS[(j + 1) % 12]}.",
    ])


def story(r):
    a, b = r.sample(NAMES, 2)
    thing, place, color = r.choice(THINGS), r.choice(PLACES), r.choice(COLORS)
    n = r.randint(2, 9)
    k = r.randint(1, n - 1)
    day = r.choice(DAYS)
    return (
        f"On {day}, {a} went to {place} with {NUMS[n]} {color} {thing}. "
        f"{a} met {b} there and gave {NUMS[k]} {thing} to {b}. "
        f"Now {a} has {NUMS[n - k]} {thing} and {b} has {NUMS[k]}. "
        f"They walked home together before dark."
    )


def counting(r):
    start = r.randint(0, 14)
    seq = ", ".join(NUMS[start : start + 6])
    return f"Counting up: {seq}."


def document(r):
    parts = [r.choice([arithmetic, calendar, story, counting])(r) for _ in range(r.randint(3, 7))]
    return " ".join(parts)


def main(n_docs=3000, vocab=2048):
    r = random.Random(1234)
    docs = [document(r) for _ in range(n_docs)]
    corpus = os.path.join(OUT, "default_corpus.jsonl")
    with open(corpus, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    tdir = os.path.join(OUT, "default_tokenizer")
    os.makedirs(tdir, exist_ok=True)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(tdir)
    print(f"wrote {corpus} ({len(docs)} documents) and {tdir} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
