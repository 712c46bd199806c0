"""Set-ups of the peer libraries that tests and benchmarks compare against; imported
only by them (the package itself never needs these libraries)."""
from __future__ import annotations

import torch


def bnb_quantize_model(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every nn.Linear (but ``skip``) by a bitsandbytes NF4 Linear4bit with double
    quantization (Params4bit's default), blocksize 64 and fp32 compute, in place, and mark
    the model as transformers does after ``load_in_4bit`` so PEFT picks its bitsandbytes
    layers."""
    import bitsandbytes as bnb

    for _, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear and name not in skip:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      quant_type="nf4", compute_dtype=torch.float32)
                q.weight = bnb.nn.Params4bit(child.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=64, compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=child.bias.requires_grad)
                setattr(mod, name, q.to("cpu"))  # Params4bit quantizes on .to(device)
    model.is_loaded_in_4bit = True
    return model
