"""Forward FLOPs of the models' parameter groups (2 per multiply-accumulate of every matmul, attention scores and
values included; causal self-attention counts half its square). A family lists its groups in data-flow order
(`Family.flops_groups`); vlm_jax/train/flops.py turns them into training FLOPs by which groups train.

A group is one layer's attention or MLP, an embedding or a head: its parameters are the paths that start with
`params` (a regex). Scanned stacks hold one array per block position for all repeats, so there each layer's
group names the stacked path and every repeat trains or freezes together, as the parameter does.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_jax.config import ModelConfig, TextEncoderConfig, ViTConfig
from vlm_jax.models.text import layer_layout

ATTENTION, ATTENTION_NORMS = r"(self_attn|cross_attn)/", r"(input_layernorm|attn_gate|gate_attn)\b"
MLP, MLP_NORMS = r"mlp/", r"(post_attention_layernorm|mlp_gate|gate_ffn)\b"


@dataclass(frozen=True)
class Group:
    name: str
    params: str  # regex matched at the start of parameter paths: the weights of the group's matmuls
    forward: float  # forward FLOPs over the whole batch
    inputs: tuple[str, ...] = ()  # the groups whose outputs it reads
    norms: str = ""  # its norm scales and gates: training one needs the gradient through the group, not its weights'


def attention(q_tokens: float, kv_tokens: float, pairs: float, hidden: int, heads: int, kv_heads: int,
              head_dim: int) -> float:
    """Projections of q/o on `q_tokens` and k/v on `kv_tokens`, scores and values over `pairs` (query, key)."""
    return (4 * q_tokens * hidden * heads * head_dim + 4 * kv_tokens * hidden * kv_heads * head_dim
            + 4 * pairs * heads * head_dim)


def encoder_groups(prefix: str, stack: str, layers: int, scanned: bool, tokens: float, pairs: float, hidden: int,
                   intermediate: int, heads: int, inputs: tuple[str, ...]) -> list[Group]:
    """`layers` pre-norm layers (attention, then a 2-matrix MLP) of a ViT or text encoder stack at
    `prefix + stack` (scanned: one stacked path; else `layers_<i>/`)."""
    groups, previous = [], inputs
    for i in range(layers):
        path = f"{prefix}{stack}/" + ("" if scanned else f"layers_{i}/")
        name = f"{prefix}{stack}/{i}"
        groups += [Group(f"{name}/attention", path + ATTENTION,
                         attention(tokens, tokens, pairs, hidden, heads, heads, hidden // heads), previous,
                         path + ATTENTION_NORMS),
                   Group(f"{name}/mlp", path + MLP, 4 * tokens * hidden * intermediate, (f"{name}/attention",),
                         path + MLP_NORMS)]
        previous = (f"{name}/mlp",)
    return groups


def vit_groups(v: ViTConfig, tower: str, images: float, scanned: bool) -> list[Group]:
    """A CLIP/SigLIP tower on `images` images. The stack runs every layer, even past the feature layer (LLaVA's
    -2); the pooled output is unused by the unified models, so XLA drops SigLIP's pooling head."""
    n, h = v.num_tokens, v.hidden_size
    embed = Group(f"{tower}/embed", f"{tower}/(?!encoder/)",
                  images * 2 * v.patches_per_side ** 2 * v.num_channels * v.patch_size ** 2 * h)
    return [embed, *encoder_groups(f"{tower}/", "encoder", v.num_layers, scanned, images * n, images * n * n, h,
                                   v.intermediate_size, v.num_heads, (embed.name,))]


def text_encoder_groups(e: TextEncoderConfig, rows: int, s: int, scanned: bool) -> list[Group]:
    """A bidirectional (or causal, same count) text encoder on `rows` texts of `s` tokens."""
    embed = Group("text/embed", "text/(?!encoder/)", 0.0)
    return [embed, *encoder_groups("text/", "encoder", e.num_layers, scanned, rows * s, rows * s * s,
                                   e.hidden_size, e.intermediate_size, e.num_heads, (embed.name,))]


def decoder_groups(m: ModelConfig, rows: int, s: int, cross_tokens: float = 0.0, cross_input: str = "",
                   embeds_from: tuple[str, ...] = ()) -> list[Group]:
    """The Llama decoder on `rows` x `s` tokens, in layer order. Its cross-attention layers attend to
    `cross_tokens` vision tokens in all (made by group `cross_input`); `embeds_from` replace token embeddings."""
    t = m.text
    _, period, _ = layer_layout(m)
    embed = Group("text/embed", "text/embed_tokens/", 0.0, embeds_from)
    groups, previous = [embed], embed.name
    for i in range(t.num_layers):
        path, name = f"text/decoder/layer_{i % period}/", f"text/{i}"
        if i in t.cross_attention_layers:
            attn = attention(rows * s, cross_tokens, s * cross_tokens, t.hidden_size, t.num_heads, t.num_kv_heads,
                             t.head_dim)
            inputs = (previous, cross_input)
        else:
            attn = attention(rows * s, rows * s, rows * s * s / 2, t.hidden_size, t.num_heads, t.num_kv_heads,
                             t.head_dim)
            inputs = (previous,)
        groups += [Group(f"{name}/attention", path + ATTENTION, attn, inputs, path + ATTENTION_NORMS),
                   Group(f"{name}/mlp", path + MLP, 6 * rows * s * t.hidden_size * t.intermediate_size,
                         (f"{name}/attention",), path + MLP_NORMS)]
        previous = f"{name}/mlp"
    head = "text/(norm|embed_tokens)/" if t.tie_word_embeddings else "text/(norm|lm_head)/"
    return groups + [Group("text/head", head, 2 * rows * s * t.hidden_size * t.vocab_size, (previous,))]
