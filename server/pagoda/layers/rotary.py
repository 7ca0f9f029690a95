"""Rotary position embedding (RoPE), with the Hugging Face frequency scalings: linear, llama3 and YaRN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.layers import cpu_ops

SUPPORTED_SCALINGS = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int  # leading dims of each head that rotate; the rest pass through (partial rotary)
    scaling: str = "default"  # one of SUPPORTED_SCALINGS
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # yarn: cos/sin are multiplied by it

    def __post_init__(self) -> None:
        if self.scaling not in SUPPORTED_SCALINGS:
            raise ValueError(
                f"unsupported rope scaling {self.scaling!r}; supported: {', '.join(SUPPORTED_SCALINGS)}"
            )

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [rotary_dim // 2], float32, computed as transformers computes them."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.scaling == "linear":
            return inv_freq / self.factor
        if self.scaling == "llama3":
            return self._llama3(inv_freq)
        if self.scaling == "yarn":
            return self._yarn(self.theta**exponents)
        return inv_freq

    def _yarn(self, pos_freqs: torch.Tensor) -> torch.Tensor:
        # high frequencies keep their value (extrapolation), low ones are divided by `factor`, with a linear
        # ramp between the dimensions that turn beta_fast and beta_slow times over the original context
        def correction_dim(rotations: float) -> float:
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return self.rotary_dim * math.log(turns) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return 1.0 / (self.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: RopeConfig) -> None:
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.attention_factor = config.attention_factor
        # non-persistent: never in the checkpoint; float32 even when the model is half precision
        self.register_buffer("inv_freq", config.inv_freq(), persistent=False)
        # every layer of a forward rotates the same positions: (positions, dtype, cos, sin) of the last one
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """positions [N], heads [N, H, D] (query and key heads together: one rotation for both) -> rotated."""
        cos, signed_sin = self.cos_sin(positions, heads.dtype)
        if self.rotary_dim == heads.shape[-1]:
            return self._rotate(heads, cos, signed_sin)
        rot, rest = heads[..., : self.rotary_dim], heads[..., self.rotary_dim :]
        return torch.cat((self._rotate(rot, cos, signed_sin), rest), dim=-1)

    def rotate_(self, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """forward, writing the rotation into `heads` where one C++ call can (on the CPU): for a caller whose
        heads are its own scratch (a view of the fresh QKV projection). Returns the rotated heads."""
        in_place = heads.device.type == "cpu" and heads.dim() == 3 and heads.stride(-1) == 1
        if not (in_place and cpu_ops.available()):
            return self.forward(positions, heads)
        cos, signed_sin = self.cos_sin(positions, heads.dtype)
        torch.ops.pagoda.rotary_embedding_(heads, cos, signed_sin)
        return heads

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables the rotation multiplies by: cos and signed_sin [N, 1, rotary_dim] in `dtype`, computed
        once per forward (per `positions` tensor)."""
        if self._last is not None and self._last[0] is positions and self._last[1] == dtype:
            return self._last[2], self._last[3]
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        # like transformers: cos/sin in float32, then the rotation in the activations' dtype
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, sin = cos.to(dtype), sin.to(dtype)
        cos = torch.cat((cos, cos), dim=-1)[:, None, :]
        signed_sin = torch.cat((-sin, sin), dim=-1)[:, None, :]
        self._last = (positions, dtype, cos, signed_sin)
        return cos, signed_sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        # transformers' x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: rolling x by half gives
        # [x2, x1], and the sign moves into sin exactly (negation never rounds)
        if x.is_cuda:  # one Triton launch instead of four kernels, the same numbers
            from pagoda.layers import triton_ops

            if (out := triton_ops.rotate(x, cos, signed_sin)) is not None:
                return out
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
