"""The settings that define bmrs's default behaviour, in one place and without importing torch (the
command line's help is built from them in well under a second).

Why each value: ``docs/decision-rule.md``.

Examples:
    >>> from bmrs import defaults
    >>> defaults.EVIDENCE_MARGIN, defaults.KL_REDUCTION, defaults.KL_WEIGHT
    (1.0, 'structure-mean', 0.3)
    >>> defaults.CRITERION_NAMES[:3], defaults.RANKING_CRITERIA
    (('none', 'bmrs-n', 'bmrs-u'), ('l2', 'grad'))
"""

from __future__ import annotations

#: Kass & Raftery (1995): a Bayes factor below e (|ΔF| < 1 nat) is "not worth more than a bare
#: mention".  Evidence for keeping a structure that weak is a tie, and a tie goes to the smaller model.
EVIDENCE_MARGIN = 1.0

#: The noise parameters (μ and log σ of every noise layer) train at this multiple of the network's
#: learning rate.  They live on a scale of tens (ln θ ∈ [−20, 0], log σ ∈ [−20, 5]) where weights live
#: on a scale of 0.1–1, and Adam moves every parameter by about the learning rate per step whatever its
#: gradient's size: at the network's rate a posterior needs ~6,000 steps to widen from its initial σ = e⁻⁵
#: to prior-like, so a structure the data does not need could not be pruned before then.
NOISE_LR_SCALE = 10.0
#: log σ starts at −5 and a posterior is prior-like from about 3: the distance the noise parameters must be
#: able to travel between two pruning steps, or a structure the data does not need is never pruned.  With few
#: steps between pruning steps (a small data set, a large batch) the rate rises to allow it, up to NOISE_LR_MAX.
NOISE_TRAVERSE = 8.0
NOISE_LR_MAX = 0.1

#: kl_loss's weightings of the KL term (see its docstring)
KL_REDUCTIONS = ("mean", "structure-mean", "elbo")
#: The KL term: the mean over all structures (the same prior pressure on each, independent of the
#: training-set size) at weight KL_WEIGHT.  LeNet5 on Fashion-MNIST, 5 + 2 epochs, against the plain
#: network: 0.3 removes 88.5-91.1% of the parameters at -0.98/-1.69 points (seeds 0/1), 0.4 93.6-94.3% at
#: -2.35/-3.03; the MLP's full schedule: 0.3 84.1%, 0.4 86.5%.
KL_REDUCTION = "structure-mean"
KL_WEIGHT = 0.3

#: The one registry of the criteria's command-line names, each with how it decides: "evidence" (ΔF against a
#: reduced prior, its own rule), "threshold" (its own rule at a threshold: ``threshold=``/``--threshold``) or
#: "ranking" (no rule: it needs an amount to prune).  ``bmrs.criteria.CRITERIA`` maps the same names to their
#: classes (tests/test_architecture.py checks that the two agree); everything else reads the names from here.
CRITERION_RULES = {
    "bmrs-n": "evidence", "bmrs-u": "evidence", "snr": "threshold", "ev": "threshold", "l2": "ranking",
    "grad": "ranking", "bmrs-n-published": "evidence",
}
#: the criteria by their command-line names ("none": train without pruning)
CRITERION_NAMES = ("none", *CRITERION_RULES)
#: the criteria that take a threshold, and those that need an amount (ranking only)
THRESHOLD_CRITERIA = tuple(name for name, rule in CRITERION_RULES.items() if rule == "threshold")
RANKING_CRITERIA = tuple(name for name, rule in CRITERION_RULES.items() if rule == "ranking")
#: the criteria ``bmrs curve`` sweeps (bmrs-n-published differs from bmrs-n by a constant only)
CURVE_CRITERIA = tuple(name for name in CRITERION_RULES if name != "bmrs-n-published")
# Fine-tuning epochs keep the noise and KL ("noisy", the paper's), or train the weights of the pruned
# network with θ fixed at E[θ]·mask and no KL ("deterministic", the default).
FINETUNE_MODES = ("noisy", "deterministic")
FINETUNE = "deterministic"
