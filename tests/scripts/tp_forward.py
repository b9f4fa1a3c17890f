"""Run under torchrun: TP=N forward of the tiny model, save at TP=N, reload at TP=N; rank 0 writes results."""
import sys

import torch

from glmctl import runtime
from glmctl.checkpoint import load_model, save_model
from glmctl.config import get_preset
from glmctl.model import GLM
from glmctl.model.masks import prefix_lm_mask


def main(out_dir, tp):
    rt = runtime.start(device="cpu", tp=int(tp))
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    model = GLM(cfg).init_weights(seed=7).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(10).expand(2, 10)
    mask = prefix_lm_mask(10, 4)
    with torch.no_grad():
        logits = model(tokens, pos, mask)
        cache = model.new_kv_cache()
        inc = torch.cat([model(tokens[:, :6], pos[:, :6], mask[..., :6, :6], kv_cache=cache),
                         model(tokens[:, 6:], pos[:, 6:], mask[..., 6:, :], kv_cache=cache)], 1)
    save_model(model, f"{out_dir}/ckpt-tp{tp}")
    reloaded = load_model(f"{out_dir}/ckpt-tp{tp}")
    with torch.no_grad():
        logits2 = reloaded(tokens, pos, mask)
    # one backward step: gradients through the TP layers must match TP=1 (checked by the test)
    model.train()
    loss = model(tokens, pos, mask).float().logsumexp(-1).mean()
    loss.backward()
    g = model.transformer.layers[0].attention.dense.bias.grad.clone()
    if rt.is_main:
        torch.save({"logits": logits, "incremental": inc, "reloaded": logits2, "dense_bias_grad": g},
                   f"{out_dir}/tp{tp}.pt")
    del model, reloaded
    runtime.stop(rt)


if __name__ == "__main__":
    main(*sys.argv[1:])
