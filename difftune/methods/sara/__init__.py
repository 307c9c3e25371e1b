"""SaRA: progressive sparse low-rank adaptation (Hu et al., ICLR 2025, arXiv 2409.06633).

The smallest weights of a pretrained model are "temporarily ineffective": SaRA trains exactly those and leaves the
rest untouched. For every targeted parameter tensor W0 (weights, biases, norm scales, embeddings: by default every
parameter of the denoiser, as the paper):

    M = |W0| < θ                    the selection, fixed at injection
    W = W0 + w · scatter_M(Δ)       Δ ∈ R^{|M|} is the flat trainable vector, Δ = 0 at the start

Training (`SaRAAdamW`, used by the trainer and as the paper's one-line API):

* **Unstructural backpropagation**: Δ is the only autograd leaf; no dense ``.grad`` and no optimizer state ever
  exist for frozen entries. By default SaRA trains *unfused*: the base tensors keep W0, M is read off them
  (|W0| < θ; only |M| per block of rows is kept) and a stock Linear/Conv2d runs with W0 + w·Δ made a block of
  output channels at a time, in the forward and again in the backward, where dL/dW[M] is formed from the same block
  of the output gradient (`unfused.UnfusedLayer`). So per selected entry only Δ, its gradient and Adam's moments
  exist, what LoRA keeps per factor entry (the paper's "less memory than LoRA" at equal count needs exactly that).
  Other parameters (norm scales, embeddings: small) run with a dense copy made per call. With
  ``fused_training`` the entries are written into the base tensor in place instead (faster where passes over the
  weights dominate; W0[M] and the positions are kept, 5 bytes per entry): a stock Linear/Conv2d then runs with a
  weight and bias that need no gradient and `grads.WeightGrad` forms dL/dW[M] in blocks from its input and output
  gradient, and other parameters go through `grads.RouteGrad`, which gathers their dense gradient at M. Same ∂L/∂Δ
  on every route up to float rounding (tested).
* **Nuclear-norm constraint** (paper eq. 4-5) with weight λ: each step one 2-D weight whose smaller side exceeds
  ``rank_min_dim`` is drawn at random and λ·∂‖ΔW‖_* = λ·U Vᵀ (singular vectors of the non-zero singular values)
  is added to its Δ's gradient. The draw comes from the optimizer's own generator (seeded alike on every process,
  saved with its state): the term is added after DDP's all-reduce, so every replica must pick the same weight.
* **Progressive parameter adjustment** (PPA) at T_p: only the entries still below θ, M' = M ∧ (|W0 + Δ| < θ), keep
  training; the others keep their trained value; Adam's moments are reset.
* **Learning rate**: when none is given, lr = 1e-3 · exp(−350 θ) (paper eq. 12).

After training the weights are edited in place (`dt.fuse`): zero inference overhead. Saved: Δ, the mask M as packed
bits, and a fingerprint of the base values (so an adapter cannot be applied to another base by accident).

Layout: `adapter.py` (the config and the adapter), `fingerprint.py` (the base check), `positions.py` (how M is
kept and saved once fused or loaded), `unfused.py` (training unfused: the weight made in blocks), `grads.py` (the
fused route's gradients), `training.py` (`SaRAAdamW`, the trainer plugin, the learning rate and
`threshold_for_fraction`).

Deliberate differences from the official code (sjtuplayer/SaRA @ ea21192), each tested:

1. The nuclear-norm term reaches the trained values. (Officially it back-propagates into the original Parameters,
   which the optimizer no longer updates, so it is a no-op.) It acts on the update ΔW, the quantity the
   constraint is meant to keep low-rank, rather than on the selected absolute values W0⊙M + ΔW.
2. λ defaults to 5e-3, the value the paper's ablation (App. K) selects; the official README/script pass 5e-4, but
   there the term never took effect, so that value was never actually in use.
3. Gradient clipping acts on Δ (officially it sees no gradients in this mode and clips nothing).
4. The mask is stored, not recomputed from the base at load time (a dtype change or another checkpoint would
   silently shift it), and loading checks the base fingerprint. While training it is read off the very tensors it
   was made from; a cast keeps it first, and a base written since is refused (|M| per block is checked).
5. No |·| on the selected values at initialization or at PPA (officially the first step runs on |W0|).
6. Decoupled weight decay pulls Δ toward 0, i.e. toward the base weights, as for any adapter; officially it pulls
   the selected absolute values toward 0. The PPA step updates as usual (officially it is skipped).
"""

from .adapter import SaRAAdapter, SaRAConfig
from .positions import pack_bits, unpack_bits
from .training import (
    SaRAAdamW,
    SaRAPlugin,
    auto_lr,
    prepare_sara,
    progressive_step,
    sara_summary,
    threshold_for_fraction,
)

__all__ = ["SaRAAdamW", "SaRAAdapter", "SaRAConfig", "SaRAPlugin", "auto_lr", "pack_bits", "prepare_sara",
           "progressive_step", "sara_summary", "threshold_for_fraction", "unpack_bits"]
