"""Teacher log-probabilities in and out: vLLM's ``prompt_logprobs`` and Axolotl's KD columns.

Inference engines produce an LLM teacher's top-k log-probabilities per prompt position (vLLM's
``prompt_logprobs``); trainers that cache them (Axolotl, DistillKit) consume them as dataset
columns. :func:`import_vllm` and :func:`import_axolotl` turn either into a packed kdcache top-k
cache, and :func:`export_axolotl` writes a kdcache top-k cache as Parquet with Axolotl's columns.

Alignment. kdcache stores, at position ``p`` of a row, the teacher's distribution *after* token
``p`` (the logits a causal LM returns there). vLLM and Axolotl store at position ``i`` the
distribution *of* token ``i`` (position 0 has none). So kdcache position ``p`` is their
position ``p + 1``; the distribution after a row's last token is in neither, so an imported row
has targets at its first ``L - 1`` real positions and an exported row loses the last one.

Imported targets are stored as they come: the K log-probabilities as the top-k ``values``
(float16) with ``logsumexp`` 0. vLLM normalises over the full vocabulary (the tail mass is
``1 - sum p``); Axolotl renormalises over the K kept ids (no tail). The cache's ``source``
records which, where the targets came from, and ``kdcache info`` shows it.
"""

from .export import export_axolotl
from .imports import axolotl_inputs, import_axolotl, import_vllm, vllm_inputs
from .sources import ImportedRow, TokenRows

__all__ = ["TokenRows", "ImportedRow", "import_vllm", "import_axolotl", "export_axolotl", "vllm_inputs",
           "axolotl_inputs"]
