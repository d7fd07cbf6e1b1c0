"""The methods the evaluation compares: one registry of names, and the fine-tune recipe.

A method name says which subset a fine-tune trains on. ``parse_method`` is the one place
that reads a name; the evaluation partitions (``DEFAULT_METHODS``), the configuration's
validation and the subsets stage all go through it:

- ``full``: the whole pool (Rel. divides by it); ``random-<seed>``: a seeded random p.
- ``icons`` / ``ofa``: the subset the ICONS / OFA graph exported, as configured.
- ``icons-paper``: the paper's rule exactly (vote, mean-rank tie-break, no coverage
  reserve); ``icons-<rule>``: Table 6's other aggregations (``consensus.AGGREGATIONS``)
  with the same rule; ``icons-maxrank``: the vote with the best single-benchmark
  percentile rank as the tie-break; ``icons-cover-<percent>``: the vote with that share of
  the subset reserved for each benchmark's own top records (Appendix D's remedy);
  ``icons-wvote``: votes weighted by their influence (the paper's future work);
  ``icons-filter``: the records in some benchmark's top half, filled in ``id_hash`` order
  (pre-registered rule 2 as a filter: influence drops records, it does not rank them).
- The pre-registered quota levers for the default (docs/preregistration-mix.md, section 5),
  each on the paper's vote: ``icons-quota`` (places per pool ``source`` in the voters' mix),
  ``icons-cluster`` (places per OFA k-means cluster in the pool's mix).
- ``direct-merge``: Table 7 (one merged validation set); ``text-vote``: the same vote over
  TF-IDF similarity to each validation set (what gradients add beyond surface text).
- ``specialist``: Table 3, one model per benchmark on its own top-p records, scored on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from icons_dagster.core.config import LoraSettings, WarmupConfig, setting
from icons_dagster.core.selection.consensus import AGGREGATIONS

EXPORTED = ("icons", "ofa")  # subsets an upstream selector wrote; the evaluation reads them
PAPER_RULE = "icons-paper"
MAX_RANK_METHOD = "icons-maxrank"
COVER_PREFIX = "icons-cover-"
RANDOM_PREFIX = "random-"
BASELINES = ("direct-merge", "text-vote")
SPECIALIST = "specialist"
#: name -> (group labels, whose shares set the group quotas)
LEVERS = {"icons-quota": ("source", "voters"), "icons-cluster": ("cluster", "pool")}
#: icons-paper and icons-<rule>: the vote table's influence under each aggregation rule
ICONS_RULES = {PAPER_RULE: "vote", **{f"icons-{name}": name for name in AGGREGATIONS if name != "vote"}}
#: the tie-break a rule's method uses where it is not the paper's mean rank
RULE_TIEBREAKS = {"filter": "id-hash"}
DEFAULT_METHODS = (
    "full", *(f"{RANDOM_PREFIX}{seed}" for seed in range(5)), "icons", *ICONS_RULES, MAX_RANK_METHOD,
    f"{COVER_PREFIX}25", f"{COVER_PREFIX}50", f"{COVER_PREFIX}100", *LEVERS,
    *BASELINES, "ofa", SPECIALIST,
)
FORMS = (
    f"full, {RANDOM_PREFIX}<seed>, icons, {', '.join(ICONS_RULES)}, {MAX_RANK_METHOD}, {COVER_PREFIX}<percent>, {', '.join(LEVERS)}, "
    f"{', '.join(BASELINES)}, ofa, {SPECIALIST}"
)


@dataclass(frozen=True)
class Method:
    """What a method name means. ``kind``: full | random | exported | icons-rule | baseline |
    specialist; the other fields are that kind's parameters."""

    name: str
    kind: str
    seed: int | None = None  # random
    aggregation: str = "vote"  # icons-rule
    tiebreak: str = "mean-rank"  # icons-rule
    coverage: float = 0.0  # icons-rule
    groups: str | None = None  # icons-rule: "source" or "cluster" quotas
    group_shares: str = "pool"  # icons-rule


def parse_method(name: str) -> Method:
    """The method a name stands for; an unknown name is an error listing every form."""
    rest = name.removeprefix(RANDOM_PREFIX)
    if name.startswith(RANDOM_PREFIX) and rest.isdigit():
        return Method(name, "random", seed=int(rest))
    rest = name.removeprefix(COVER_PREFIX)
    if name.startswith(COVER_PREFIX) and rest.isdigit() and 1 <= int(rest) <= 100:
        return Method(name, "icons-rule", coverage=int(rest) / 100)
    if name in ICONS_RULES:
        aggregation = ICONS_RULES[name]
        return Method(name, "icons-rule", aggregation=aggregation, tiebreak=RULE_TIEBREAKS.get(aggregation, "mean-rank"))
    if name == MAX_RANK_METHOD:
        return Method(name, "icons-rule", tiebreak="max-rank")
    if name in LEVERS:
        groups, shares = LEVERS[name]
        return Method(name, "icons-rule", groups=groups, group_shares=shares)
    kinds = {"full": "full", SPECIALIST: "specialist", **dict.fromkeys(EXPORTED, "exported"), **dict.fromkeys(BASELINES, "baseline")}
    if name in kinds:
        return Method(name, kinds[name])
    raise ValueError(f"unknown evaluation method {name!r}: {FORMS}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Which methods are compared and the one fine-tuning recipe they all get.

    The subsets are cut at the selection's ``p`` (selection.p; OFA's ``p`` must match).
    """

    methods: tuple[str, ...] = setting((), "methods to compare (comma-separated); empty or 'all': every evaluation partition", aliases=("--methods",))
    learning_rate: float = setting(2e-4, "fine-tune learning rate", aliases=("--learning-rate",))
    epochs: int = setting(1, "fine-tune epochs over each subset", aliases=("--epochs",))
    batch_size: int = setting(4, "fine-tune batch size", aliases=("--batch-size",))
    seed: int = setting(0, "fine-tune seed", aliases=("--seed",))
    max_new_tokens: int = setting(64, "tokens generated per test answer")
    # False: the paper's recipe, ``epochs`` over each subset. True: every subset is trained
    # for about as many steps as the full data gets (epochs x N / |subset|, rounded).
    equal_steps: bool = setting(False, "train every subset about as many steps as the full data", aliases=("--equal-steps",))
    lora_r: int = setting(0, "the fine-tune's LoRA rank; 0 = the warm-up's LoRA")
    lora_alpha: int = setting(0, "the fine-tune's LoRA alpha; 0 = twice its rank")
    bootstrap_resamples: int = setting(
        2000,
        "resamples of each benchmark's test records (paired across methods) for the 95% interval on each method's "
        "Rel. difference to random; 2000 is the pre-registered protocol (fewer: a noisier interval)",
        aliases=("--bootstrap-resamples",),
    )

    def __post_init__(self) -> None:
        if isinstance(self.methods, (list, str)):
            object.__setattr__(self, "methods", tuple([self.methods] if isinstance(self.methods, str) else self.methods))
        if self.methods == ("all",):
            object.__setattr__(self, "methods", ())
        for method in self.methods:
            parse_method(method)
        if self.bootstrap_resamples < 1:
            raise ValueError(f"evaluation.bootstrap_resamples must be >= 1, not {self.bootstrap_resamples}")
        if self.methods and "full" not in self.methods:
            raise ValueError("the evaluation needs the 'full' method: Rel. divides by the full-data score")

    @property
    def compared(self) -> tuple[str, ...]:
        """The methods compared: the configured ones, or every default method."""
        return self.methods or DEFAULT_METHODS

    def partition_methods(self) -> tuple[str, ...]:
        """The compared methods in the evaluation partitions' order; each must be a partition."""
        unknown = [m for m in self.compared if m not in DEFAULT_METHODS]
        if unknown:
            raise ValueError(f"evaluation.methods {unknown} are not evaluation partitions; choose from {list(DEFAULT_METHODS)}")
        return tuple(m for m in DEFAULT_METHODS if m in self.compared)

    def lora_for(self, model_lora: LoraSettings) -> LoraSettings:
        """The LoRA every method's fine-tune gets (the selection's own LoRA unless set here)."""
        if not self.lora_r:
            return model_lora
        return LoraSettings(self.lora_r, self.lora_alpha or 2 * self.lora_r, model_lora.dropout, model_lora.target_modules)

    def recipe(self, n_subset: int, n_pool: int) -> WarmupConfig:
        """The fine-tune recipe (the warm-up trainer on a whole subset: ratio 1, one checkpoint)."""
        epochs = max(self.epochs, round(self.epochs * n_pool / max(1, n_subset))) if self.equal_steps else self.epochs
        return WarmupConfig(
            ratio=1.0, seed=self.seed, learning_rate=self.learning_rate, epochs=epochs, num_checkpoints=1, batch_size=self.batch_size
        )
