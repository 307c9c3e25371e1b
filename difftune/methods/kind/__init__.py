"""KIND: Knowledge Integration and Diversion (Xie, Feng, Wang, Geng, Rui; arXiv 2408.07337, ICML 2025), reconstructed.

No official code exists and the paper's full text could not be read (shared/reference/kind-vq4dit.md §1); this file
builds what the abstracts, the review and the same group's DivControl confirm, and chooses the rest deliberately.

Each targeted linear W ∈ R^{m×n} of the DiT/PixArt blocks, S = {q, k, v, o, MLP in, MLP out} (adaLN optional, off
by default), is replaced by r rank-1 "basic components" Θ_i = (u_i, σ_i, v_i), trained in factored form::

    W_y = Σ_{i<N_G} u_i σ_i v_iᵀ  +  Σ_{i ∈ T(y)} u_i σ_i v_iᵀ

The first N_G components are **learngenes** (active for every sample); the rest are **tailors**, grouped per class:
the binary class gate g_y switches on only the group T(y) of the item's class label y (taken per batch item from
the DiT forward's ``class_labels``), so learngenes receive gradients from every class and a tailor only from its
own class. At weight 1 the layer is exactly the KIND layer plus the base bias, W_y x + b, computed without W0
(`KINDAdapter.replace_output`: the host does not run the base layer); at other weights, or with another adapter fused
into the layer, the host computes ``base(x) + w·δ(x)`` with δ(x) = W_y x − W0 x.

Choices the paper may make otherwise (all [U] in the reference notes):

* **Disjoint per-class groups** of ``tailors_per_class`` components for each id in ``classes`` (not superclass or
  overlapping groups).
* **Null class → learngenes only**: a label with no tailor group (the CFG null class 1000, or any other) runs on
  the learngenes alone; no dedicated null group.
* **SVD init** (default): U Σ Vᵀ of the dense weight (pretrained or random); learngenes take the top N_G triplets and
  every class's group a copy of the next ``tailors_per_class``, so every class starts at the rank-(N_G + t)
  truncation of W: exactly W when N_G + t = min(m, n). ``init="random"``: independent random unit u, v and a
  constant σ of Kaiming-like scale.
* **Unconstrained factors**: no orthogonality regulariser or retraction; no gate renormalisation.
* **Transfer** (``source`` set): learngenes (and the tailors of ``reuse_classes``) are copied from a saved KIND
  adapter and frozen; the other groups are fresh: random unit u, v with σ = 0 (the layer starts at the transferred
  model for those classes), and only they train. Embedders, adaLN and the final layer stay frozen unless
  ``train_base`` (used for pretraining with KIND structure, where the whole model trains).
* **Class embeddings** (``class_embeddings``, default on; not in the sources): each class's row of the DiT's
  class-embedding tables belongs to its tailors (`KINDClassRows`), so a transfer's new classes learn their own
  embedding with their tailors instead of keeping the pretrained model's never-trained random row; the null class
  keeps the base row.
* **Recombination** (`recombine`): learngenes + the chosen groups form a smaller model; its factored cost is
  (N_G + t)(m + n) MACs per token and layer instead of m·n (`factored_macs`).

Layout: `adapter.py` (the config, the layers), `parts.py` (part loading, recombination, MACs, the calculator),
`training.py` (the trainer plugin).
"""

from .adapter import (  # noqa: F401
    ADALN_TARGET,
    EMBED_TARGET,
    PAPER_TRAINABLE,
    S_TARGETS,
    KINDAdapter,
    KINDClassRows,
    KINDConfig,
)
from .parts import calculator, factored_macs, kind_adapters, load_parts, recombine  # noqa: F401
from .training import KINDPlugin  # noqa: F401
