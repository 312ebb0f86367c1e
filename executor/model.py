"""A decoder-only Llama-style transformer, defined in code.

RMSNorm, rotary positions (HF `rotate_half` convention, optional `linear` or
`llama3` frequency scaling), grouped-query attention, SwiGLU MLP, tied or
untied embeddings. Parameter names are exactly those of Hugging Face's
`LlamaForCausalLM`, so a local `config.json` + `model.safetensors` directory
loads as is, and `save_pretrained` writes one back. Nothing here touches a
hub or the network.

The model works on a flat batch of tokens (`input_ids[T]`, `positions[T]`);
how attention finds each token's context is the caller's business, passed in
as an `AttentionFn` (the paged KV cache in `executor.paged`, or the dense
causal reference below).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# (layer index, q [T, n_heads, head_dim], k [T, n_kv_heads, head_dim], v [T, n_kv_heads, head_dim])
#   -> attention output [T, n_heads, head_dim]; q and k already carry rotary positions.
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: "linear" (positions / factor) or "llama3" (Llama 3.1+ frequency bands)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling type {self.kind!r} is not supported; allowed: linear | llama3")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 8192
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 1024
    max_position: int = 4096
    rope_theta: float = 10000.0
    dtype: str = "float32"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim_override: int | None = None  # HF `head_dim` when it is not hidden // heads
    rope_scaling: RopeScaling | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for k in ("vocab", "hidden", "layers", "heads", "kv_heads", "intermediate", "max_position"):
            if getattr(self, k) < 1:
                raise ValueError(f"model.{k} must be >= 1, got {getattr(self, k)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if self.head_dim_override is None and self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; allowed: {' | '.join(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override if self.head_dim_override is not None else self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_params(self) -> int:
        hd = self.head_dim
        attn = self.hidden * hd * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + emb + self.hidden

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies in the cache, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.torch_dtype.itemsize

    # ---- Hugging Face config.json ------------------------------------------------
    @staticmethod
    def from_hf(d: dict[str, Any], name: str = "hf") -> ModelConfig:
        """From a Hugging Face LlamaConfig dict (config.json). Refuses what this model cannot run."""
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "mistral"):
            raise ValueError(f"config.json model_type={mt!r}; only Llama-style models are supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}; only silu (SwiGLU) is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config.json {flag}=true is not supported")
        if d.get("sliding_window") not in (None, 0) and mt == "mistral":
            raise ValueError("config.json sliding_window attention is not supported")
        rs = d.get("rope_scaling")
        scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "default":
                scaling = None
            else:
                scaling = RopeScaling(
                    kind=kind, factor=float(rs["factor"]),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
                )
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        hd = d.get("head_dim")
        dtype = d.get("torch_dtype", d.get("dtype")) or "float32"
        return ModelConfig(
            vocab=int(d["vocab_size"]), hidden=hidden, layers=int(d["num_hidden_layers"]), heads=heads,
            kv_heads=int(d.get("num_key_value_heads") or heads), intermediate=int(d["intermediate_size"]),
            max_position=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(d.get("rope_theta", 10000.0)), dtype=str(dtype),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim_override=int(hd) if hd is not None and int(hd) != hidden // heads else None,
            rope_scaling=scaling, name=name,
        )

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab, "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate, "max_position_embeddings": self.max_position,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings, "torch_dtype": self.dtype, "head_dim": self.head_dim,
            "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            d["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                d["rope_scaling"].update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                                         original_max_position_embeddings=rs.original_max_position)
        return d


# Named shapes. "default" was measured on the 2-core CPU the project is developed on (see
# experiments/bench_executor.py); "llama-3.2-1b" is the real model's shape (random weights unless loaded).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                        max_position=1024, name="tiny"),
    "default": ModelConfig(name="default"),
    "llama-3.2-1b": ModelConfig(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                                max_position=131072, rope_theta=500000.0, dtype="bfloat16",
                                tie_embeddings=True,
                                rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), name="llama-3.2-1b"),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {' | '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---- rotary positions -------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, device: torch.device) -> Tensor:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between (as in HF).
    low_wl = rs.original_max_position / rs.low_freq_factor
    high_wl = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(cfg: ModelConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    freqs = positions.to(torch.float32)[:, None] * rope_inv_freq(cfg, positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- modules (HF parameter names) -------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **kw: Any):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, **kw))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw: Any):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * hd, bias=False, **kw)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=False, **kw)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=False, **kw)
        self.o_proj = nn.Linear(cfg.heads * hd, cfg.hidden, bias=False, **kw)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, attention: AttentionFn) -> Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        o = attention(layer, q, k, v)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw: Any):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False, **kw)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False, **kw)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw: Any):
        super().__init__()
        self.self_attn = SelfAttention(cfg, **kw)
        self.mlp = MLP(cfg, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps, **kw)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, layer: int, attention: AttentionFn) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, layer, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw: Any):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, **kw)
        self.layers = nn.ModuleList(DecoderLayer(cfg, **kw) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, **kw)


class LlamaForCausalLM(nn.Module):
    """Build with `from_seed` or `from_pretrained`; the constructor leaves weights uninitialised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kw = {"dtype": cfg.torch_dtype}
        self.cfg = cfg
        self.model = LlamaModel(cfg, **kw)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab, bias=False, **kw)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_seed(cls, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> LlamaForCausalLM:
        """Random weights from `seed` (own torch.Generator, drawn on the CPU: same weights on any device).

        Scaled so that every layer's output is about as large as its input: attention, not just
        the current token's embedding, decides the next token, as in a trained model.
        """
        with torch.device("meta"):
            m = cls(cfg)
        m.to_empty(device=device)
        g = torch.Generator().manual_seed(seed)
        out_scale = 1.0 / math.sqrt(2 * cfg.layers)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    w = torch.ones(p.shape)
                elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                    w = torch.randn(p.shape, generator=g) / math.sqrt(cfg.hidden)
                else:  # Linear [out, in]
                    w = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        w *= out_scale
                p.copy_(w.to(p.dtype))
        return m.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: str | None = None) -> LlamaForCausalLM:
        """Load a local HF-layout directory: config.json plus model.safetensors (or a sharded index)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), name=path.name)
        if dtype is not None:
            cfg = replace(cfg, dtype=dtype)
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(path / f)))
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        with torch.device("meta"):
            m = cls(cfg)
        m.to_empty(device=device)
        expected = dict(m.named_parameters())
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, p in expected.items():
                w = state[name]
                if w.shape != p.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(w.shape)}, config implies {tuple(p.shape)}")
                p.copy_(w.to(p.dtype))
        # Unused tensors (e.g. rotary_emb.inv_freq in old checkpoints) are ignored.
        return m.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json and model.safetensors in the HF Llama layout (tied lm_head omitted, as HF does)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.cfg.to_hf(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    # ---- forward ------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn) -> Tensor:
        """Hidden states [T, hidden] (before the final norm) for a flat batch of T tokens."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.cfg, positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, i, attention)
        return h

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits [N, vocab] for selected rows of `forward`'s output, in float32 (or float64)."""
        h = self.model.norm(hidden)
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        out = F.linear(h, w)
        return out if out.dtype == torch.float64 else out.float()

    @torch.inference_mode()
    def reference_logits(self, token_ids: list[int] | Tensor) -> Tensor:
        """Logits [T, vocab] at every position of one sequence: full causal attention, no cache."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.arange(ids.shape[0], device=self.device)
        return self.logits(self(ids, pos, dense_causal_attention))


def dense_causal_attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain attention of one whole sequence over itself (the reference the paged path must match)."""
    t, h, d = q.shape
    g = h // k.shape[1]
    k = k.repeat_interleave(g, dim=1)  # kv head j serves query heads j*g .. j*g+g-1, as HF's repeat_kv
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    p = p.to(q.dtype)
    return torch.einsum("hqk,khd->qhd", p, v)

