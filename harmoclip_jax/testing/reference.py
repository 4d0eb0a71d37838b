"""PyTorch reference models (transformers CLIPModel, open_clip CLIP) with random weights, for parity tests and
benchmarks. Needs the dev requirements (torch, transformers, open_clip_torch)."""
from __future__ import annotations

from harmoclip_jax.models.convert import hf_config_dict
from harmoclip_jax.models.variants import CLIPConfig, get_config
from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack


def randomize_(module, seed: int = 0, std: float = 0.02) -> None:
    """Gives every parameter random values (biases and LayerNorm offsets included) so a mis-mapped tensor
    cannot hide behind a zero or one init."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("logit_scale"):
                p.copy_(torch.tensor(2.6592 + 0.3 * float(noise)))
            elif ("norm" in name or ".ln_" in name or name.startswith("ln_") or "layrnorm" in name) and \
                    name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(std * noise)


def hf_clip_model(variant: str | CLIPConfig, seed: int = 0, **overrides):
    """A transformers `CLIPModel` of our architecture with random weights, in eval mode."""
    ensure_torch_reference_stack()
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    d = hf_config_dict(get_config(variant, **overrides))
    model = CLIPModel(HFCLIPConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")}))
    randomize_(model, seed)
    return model.eval()


def open_clip_model(variant: str | CLIPConfig, seed: int = 0, **overrides):
    """A real `open_clip.CLIP` of our architecture with random weights, in eval mode."""
    ensure_torch_reference_stack()
    import open_clip

    c = get_config(variant, **overrides)
    v, t = c.vision, c.text
    model = open_clip.CLIP(
        embed_dim=c.embed_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width, head_width=v.width // v.heads,
                        patch_size=v.patch_size, mlp_ratio=v.mlp_ratio),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers, mlp_ratio=t.mlp_ratio),
        quick_gelu=c.activation == "quick_gelu",
    )
    randomize_(model, seed)
    return model.eval()


def open_clip_file_module(name: str):
    """open_clip's `<name>.py` (e.g. "tokenizer", "loss") loaded by path: the real open_clip code without importing
    the whole package (whose import pulls in torchvision)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip_torch is not installed (it is in requirements-dev.txt)")
    path = os.path.join(spec.submodule_search_locations[0], f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"open_clip_{name}_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def hf_dense_features(hf, images):
    """Dense patch embeddings (B, g, g, E) of a transformers `CLIPModel` for NHWC float images: the
    FineCLIP/CLIPSelf last-block trick (value path only, no attention) written on transformers' own modules."""
    import torch

    vm = hf.vision_model
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(torch.as_tensor(images).permute(0, 3, 1, 2)))
        for layer in vm.encoder.layers[:-1]:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        last = vm.encoder.layers[-1]
        x = x + last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(x)))
        x = x + last.mlp(last.layer_norm2(x))
        x = hf.visual_projection(vm.post_layernorm(x[:, 1:]))
    g = int(round(x.shape[1] ** 0.5))
    return x.reshape(x.shape[0], g, g, -1).numpy()
