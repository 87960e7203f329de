"""Build a tiny, deterministic Llama model that vLLM can serve, with no download.

Usage (with the vLLM venv's python, which has torch, transformers and tokenizers):
    python tools/demo_model.py OUT_DIR

The tokenizer and the model are both trained on the Python standard library's sources,
the one sizeable corpus present on every machine, so the model writes text that looks
vaguely like Python. A fixed seed and thread count make rebuilds on one machine
byte-identical. The result (~3 MB) is written to OUT_DIR.tmp and renamed into place,
so OUT_DIR exists only when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 0
CORPUS_CHARS = 2_000_000  # ~110 files, ~610k tokens: about 1.3 epochs of the training below
VOCAB_SIZE = 2048
# The context the model declares. Llama's rotary positions need no trained weights, so a
# long one costs nothing; vLLM sizes its RoPE table from it (serving beyond it crashes).
# The end-to-end tier uses it whole for generations long enough to hang up in the middle.
MAX_LEN = 16384
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2
STEPS, BATCH, SEQ_LEN, LR = 400, 16, 128, 3e-3
# A plain "role: content" template so /v1/chat/completions works as well as completions.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus() -> list[str]:
    """Stdlib sources in sorted order (tests and site-packages excluded), capped in size."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        parts = path.relative_to(stdlib).parts
        if "site-packages" in parts or any(p.startswith(("test", "idle_test")) for p in parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= CORPUS_CHARS:
            break
    return texts


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # BOS lives in tokenizer.json's post-processor, so vLLM and transformers (which both
    # load this file) prepend <s> the same way.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A </s> <s> $B",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    # Each file is one document: <s> ... </s>, so the model learns to stop.
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def train_model(stream: torch.Tensor) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True,  # halves the file; vLLM's Llama supports it
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS)
    # Batch offsets come from their own generator so that they do not depend on how many
    # random numbers model initialisation consumed.
    batches = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(STEPS):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (BATCH,), generator=batches)
        x = torch.stack([stream[s : s + SEQ_LEN] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval()


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    # Written by hand rather than by save_pretrained(), whose output differs between
    # transformers 4 and 5 (5 names a class that 4 lacks); these files load in both.
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": MAX_LEN,
        "chat_template": CHAT_TEMPLATE,
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    tmp = out.with_name(out.name + ".tmp")
    started = time.monotonic()
    # Fixed thread count too: float reductions split differently across threads.
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    texts = corpus()
    tok = train_tokenizer(texts)
    model = train_model(token_stream(tok, texts))

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tok, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"demo model written to {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
