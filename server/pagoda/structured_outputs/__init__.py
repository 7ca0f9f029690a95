"""Constrained decoding: a grammar per request, a matcher per sequence, one token bitmask per step.

`params.py` says what the client asked for, `backend.py` turns it into grammars and matchers (the only
module that knows the grammar library), `bitmask.py` masks the logits of the whole batch at once. Only the
params are imported here: `pagoda.SamplingParams` needs them, and the CLI's --help should not load torch.
"""

from pagoda.structured_outputs.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
