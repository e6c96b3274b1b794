"""Prompt-pool methods on a frozen MLLM: ``prompt_pool`` (L2P-style) and ``fwd_prompt``
(Zheng et al., arXiv 2401.09181; our reconstruction, see docs/methods below).

The pool has ``pool_size`` entries, each an image key (vision width), a text key and a prompt
value (``length`` x the language model's width). For every sample, a frozen query is formed
from its image (the vision tower's pooled feature) and its instruction (mean input embedding
of its text tokens); the ``top_k`` entries with the highest cos(image) + cos(text) are
selected and their prompts replace ``top_k x length`` placeholder positions right after <s>
(the encoder's ``prefix_tokens``), so training, batched generation and the KV cache all see an
ordinary, longer prompt. With ``depth`` n > 1 (deep prompts, as in P-tuning v2 / VPT-deep),
each entry also holds prompts for the inputs of decoder layers 1..n-1, which overwrite the same
placeholder columns of those layers' hidden states in a prefill (decoding steps read them from
the KV cache). A key-matching loss (1 - cos) pulls the selected keys toward their
queries (a training sample's query leaves its answer out: generation has none). While training,
selection is L2P's batch-wise one (``batchwise``: the whole batch takes the ``top_k`` entries its
samples selected most) and diversified one (``diversity``): entries that earlier tasks selected
look farther away and unused entries come first, so each task trains entries of its own and
keys them to its queries. ``key_fit: exact`` then sets those entries' keys to the key loss's
exact minimiser over the task's queries (spherical k-means with ``keys`` per entry). Only the pool trains; the MLLM is frozen; no replay.

``fwd_prompt`` adds gradient projection on the prompt values (GPM-style, in the language
model's input-embedding space of width d):

- after each task, the input embeddings of ``basis_samples`` of its training samples (text and
  image tokens, placeholders excluded) extend an orthonormal old-task basis U_old until it
  captures ``energy`` of their squared norm; with ``balance`` the image-token rows and the
  text-token rows each reach ``energy`` of their own norm (in the tiny model image-token
  embeddings are ~80x the norm of text ones, so unbalanced, 2-3 image directions capture 95%
  and no task's text subspace enters the basis; balanced, the projection constrains the
  prompts, which on the embedded stream cost more plasticity than it saved: off by default);
- once, before the first task, U_pre spans the base model's input embeddings on its
  pre-training mix (``pretrained_energy``);
- each step, g_res = g - g U_old U_oldᵀ (``residual``), then
  g' = P_old⊥(g_res + ``pretrained`` · g_res U_pre U_preᵀ): the pre-trained component of the
  residual is reinforced, and the result is projected off U_old again so that it stays
  orthogonal to every old task's subspace.

With deep prompts each prompted layer input has its own U_old and U_pre, built the same way from
that layer's input hidden states (GPM's per-layer bases), and each layer's prompts are projected
with them.

The residual projection protects an old task only through entries its samples still select.
With diversified selection (the default) each task trains entries of its own, so there is
little for it to protect; with ``diversity: false`` every task trains the same entries, and
there balanced bases halve the forgetting (configs/synth/broad_start/shared/, README).

The public record confirms the two projections and the pool; the energy criterion, the
weighting, the re-projection and the deep prompts are our reconstruction.
"""

from mcit.methods.prompt.fwd import FwdPrompt, FwdPromptOptions
from mcit.methods.prompt.gpm import extend_basis, project
from mcit.methods.prompt.options import PromptPoolOptions
from mcit.methods.prompt.pool import POOL_ATTR, PromptPool
from mcit.methods.prompt.pool_method import PromptPoolMethod

__all__ = ["POOL_ATTR", "FwdPrompt", "FwdPromptOptions", "PromptPool", "PromptPoolMethod", "PromptPoolOptions",
           "extend_basis", "project"]
