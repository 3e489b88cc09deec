"""The held-out loss gap, one difference at a time: peft vs deltatune on the SAME batches.

Both sides train the default model with LoRA r16/alpha32 all-linear for N steps on the same
samples, batches of 8 in one seeded order, the same LoRA A init (peft's, copied), the same AdamW,
clipping and HF-style linear warmup/decay; all are scored the same way (padded batches, bf16
autocast, target-token mean loss) on the train_throughput data's held-out set. Variants:

    peft                      peft model, fp32 base, bf16 autocast, padded batches
    dt_fp32base               deltatune's LoRA layers + loss on the fp32 base (bit-equal to peft)
    dt                        ... on the bf16 base (what deltatune holds by default)
    dt_fp32embed              bf16 linear weights, fp32 embeddings and norms
    dt_packed_packattn        deltatune's packed rows (best-fit decreasing), 2 rows/step, packed attention
    dt_packed_packattn_shuf   the same with shuffled best fit (the training default now)

    python benchmarks/train_gap.py VARIANT [STEPS]   # prints RESULT {...}; writes OUT/train_gap/VARIANT.json
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import make_data

from deltatune import attention
from deltatune.data import load_samples
from deltatune.deltas import add_delta, named_delta_parameters
from deltatune.models import load_model, load_tokenizer
from deltatune.train.loop import CausalLMLoss

variant = sys.argv[1]  # peft | dt | dt_fp32base | dt_packed_attn ...
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
torch.set_num_threads(2)
W = Path(__file__).parent / "out" / "train_gap"
W.mkdir(parents=True, exist_ok=True)
data, evd = W / "train.jsonl", W / "eval.jsonl"
if not data.exists():
    make_data(data, 600, seed=0)
    make_data(evd, 64, seed=10_000)
tok = load_tokenizer("default")
train = load_samples(data, tok)
evals = load_samples(evd, tok)
L = 512


def pad_batch(ss):
    n = max(min(len(s.input_ids), L) for s in ss)
    ids = torch.full((len(ss), n), tok.pad_token_id)
    lab = torch.full((len(ss), n), -100)
    att = torch.zeros((len(ss), n), dtype=torch.long)
    pos = torch.zeros((len(ss), n), dtype=torch.long)
    for i, s in enumerate(ss):
        m = min(len(s.input_ids), L)
        ids[i, :m] = torch.tensor(s.input_ids[:m])
        lab[i, :m] = torch.tensor(s.labels[:m])
        att[i, :m] = 1
        pos[i, :m] = torch.arange(m)
        pos[i, m:] = torch.arange(n - m)
    return ids, lab, att, pos


g = torch.Generator().manual_seed(0)
perm = torch.randperm(len(train), generator=g).tolist()
batches = [[train[j] for j in perm[i * 8 : (i + 1) * 8]] for i in range(steps)]
if "packed" in variant:
    from deltatune.data import pack
    from deltatune.train.loop import rows_for_step

    rows = pack(train, L, tok.pad_token_id, order="shuffled" if "shuf" in variant else "longest_first")
    nr = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    batches = [rows_for_step(s, rows.input_ids.shape[0], nr, 0) for s in range(steps)]
    print(
        "rows",
        rows.input_ids.shape[0],
        "tokens/step",
        sum(int((rows.input_ids[b] != tok.pad_token_id).sum()) for b in batches) / steps,
    )

torch.manual_seed(0)
from peft import LoraConfig, get_peft_model  # noqa: E402

ref = get_peft_model(
    load_model("default"), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
)
initA = {
    n.replace("base_model.model.", "").replace(".lora_A.default", ".lora_A"): p.detach().clone()
    for n, p in ref.named_parameters()
    if "lora_A" in n
}
if variant == "peft":
    model = ref
    params = [p for p in model.parameters() if p.requires_grad]
else:
    del ref
    base_dtype = torch.float32 if "fp32base" in variant else torch.bfloat16
    model = load_model("default", dtype=base_dtype)
    if "fp32embed" in variant:
        for _name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Embedding) or "norm" in type(mod).__name__.lower():
                for p in mod.parameters(recurse=False):
                    p.data = p.data.float()
    if "packattn" in variant:
        attention.use_packed_attention(model)
    add_delta(model, "lora", lora_r=16, lora_alpha=32)
    nd = named_delta_parameters(model)
    for n, p in nd.items():
        p.data = p.data.float()
        if "lora_A" in n:
            key = n if n in initA else None
            p.data.copy_(initA[n])
    params = [p for p in nd.values() if p.requires_grad]
    loss_fn = CausalLMLoss(model, 1024)
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def hf_lr(step, warm=3, total=steps):
    if step < warm:
        return step / max(1, warm)
    return max(0.0, (total - step) / max(1, total - warm))


def dt_lr(step, warm=3, total=steps):
    if step < warm:
        return (step + 1) / (warm + 1)
    return max(0.0, 1 - (step - warm) / max(1, total - warm))


sched = dt_lr if "dtsched" in variant else hf_lr
log = []
t0 = time.time()
model.train()
for step, b in enumerate(batches):
    for gr in opt.param_groups:
        gr["lr"] = 1e-3 * sched(step)
    if "packed" in variant:
        ids, lab, pos = rows.input_ids[b], rows.labels[b], rows.position_ids[b]
    else:
        ids, lab, att, pos = pad_batch(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if variant == "peft":
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        else:
            n = int((lab[:, 1:] != -100).sum())
            if "packattn" in variant:
                loss = loss_fn(ids, pos, lab) / n
            else:
                hidden = model.base_model(
                    input_ids=ids, attention_mask=att, use_cache=False
                ).last_hidden_state[:, :-1]
                t = lab[:, 1:]
                k = t != -100
                logits = model.get_output_embeddings()(hidden[k]).float()
                loss = torch.nn.functional.cross_entropy(logits, t[k])
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    log.append((round(loss.item(), 5), round(gn, 4)))
print("train", variant, time.time() - t0, log[:3], log[-3:])
# eval the peft way: padded, autocast bf16 on model forward
model.eval()
tot = cnt = 0
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for i in range(0, len(evals), 8):
        ids, lab, att, pos = pad_batch(evals[i : i + 8])
        hidden = (model.base_model.model.model if variant == "peft" else model.base_model)(
            input_ids=ids, attention_mask=att, use_cache=False
        ).last_hidden_state[:, :-1]
        t = lab[:, 1:]
        k = t != -100
        head = model.get_output_embeddings()
        tot += torch.nn.functional.cross_entropy(head(hidden[k]).float(), t[k], reduction="sum").item()
        cnt += int(k.sum())
res = {"variant": variant, "eval_loss": tot / cnt, "train_log": log}
print(
    "RESULT",
    json.dumps({"variant": variant, "eval_loss": tot / cnt, "last5": sum(x for x, _ in log[-5:]) / 5}),
)
(W / f"{variant}.json").write_text(json.dumps(res))
