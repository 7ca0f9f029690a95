"""Expert weights, from each family's checkpoint names to the stacked `w13` / `w2` of `FusedMoE`.

Checkpoints store experts three ways:
- one tensor per expert and projection: Mixtral's `block_sparse_moe.experts.3.w1.weight` (w1 gate,
  w3 up, w2 down), Qwen's `mlp.experts.3.gate_proj.weight`;
- stacked over the experts, [E, ...] (GGUF's ffn_*_exps, renamed `mlp.experts.gate_proj.weight`);
- gpt-oss: `mlp.experts.gate_up_proj` [E, H, 2I] with gate and up interleaved column by column,
  `down_proj` [E, I, H], their biases, or the released MXFP4 form (`*_blocks` / `*_scales`, [E, out, ...]).
`normalize_expert_names` turns the last form into the second, dequantizing MXFP4 on the way;
`expert_shards` maps the first two to (parameter, (expert, part), tensor) loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from pagoda.layers.moe import DOWN, GATE, UP, ExpertShard
from pagoda.loader.checkpoint import QuantizedBlocks

_PARTS = {"w1": GATE, "gate_proj": GATE, "w3": UP, "up_proj": UP, "w2": DOWN, "down_proj": DOWN}
_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.(weight|bias)")
_STACKED = re.compile(r"(.+\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
_GPT_OSS = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")

# the 16 values of an FP4 (e2m1) nibble
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., G, 16] uint8 (32 FP4 values, low nibble first) with one power-of-two scale per
    block [..., G] (biased exponent, 127 = 1) -> float32 [..., G * 32]."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)


def normalize_expert_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename Mixtral's, gpt-oss's and DeepSeek's MoE modules to ours, and gpt-oss's fused expert tensors
    to stacked per-projection ones."""
    halves: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 blocks waiting for their scales, or back
    for name, tensor in weights:
        name = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.router.", ".mlp.gate.")
        name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")  # DeepSeek's
        match = _GPT_OSS.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        prefix, proj, suffix = match.groups()
        kind = "bias" if suffix == "_bias" else "weight"
        if suffix in ("_blocks", "_scales"):
            pair = halves.setdefault(f"{prefix}.{proj}", {})
            pair[suffix] = tensor
            if len(pair) < 2:
                continue
            del halves[f"{prefix}.{proj}"]
            tensor = dequantize_mxfp4(pair["_blocks"], pair["_scales"])  # [E, out, in]
        elif suffix is None:
            tensor = tensor.transpose(1, 2)  # [E, in, out] -> [E, out, in], as a linear layer stores it
        if proj == "down_proj":
            yield f"{prefix}.down_proj.{kind}", tensor
        else:  # rows (or bias entries) alternate gate, up
            yield f"{prefix}.gate_proj.{kind}", tensor[:, 0::2]
            yield f"{prefix}.up_proj.{kind}", tensor[:, 1::2]
    if halves:
        raise ValueError(f"MXFP4 expert weights without their blocks or scales: {', '.join(halves)}")


def expert_shards(
    name: str, tensor: torch.Tensor | QuantizedBlocks
) -> list[tuple[str, ExpertShard, torch.Tensor | QuantizedBlocks]] | None:
    """(parameter name, (expert, part), tensor) for each expert an expert tensor holds; None for others."""
    if match := _PER_EXPERT.fullmatch(name):
        prefix, expert, proj, kind = match.groups()
        return [(_target(prefix, _PARTS[proj], kind), (int(expert), _PARTS[proj]), tensor)]
    if match := _STACKED.fullmatch(name):
        prefix, proj, kind = match.groups()
        part = _PARTS[proj]
        experts = tensor.unstacked() if isinstance(tensor, QuantizedBlocks) else tensor  # GGUF's, kept
        return [(_target(prefix, part, kind), (expert, part), t) for expert, t in enumerate(experts)]
    return None


def _target(prefix: str, part: int, kind: str) -> str:
    return f"{prefix}.{'w2' if part == DOWN else 'w13'}{'_bias' if kind == 'bias' else ''}"
