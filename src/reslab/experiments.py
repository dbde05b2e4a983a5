"""The paper's experiments as data: which models, which recipe, how many seeds, at which budget.

Budgets scale the paper's CIFAR schedule (64k iterations, lr /10 at 32k and 48k, batch 128):
  quick   x0.015 -> 960 iterations (lr steps at 480 and 720), evaluated every 320; ~2.5 epochs.
                    Sized for a 2-core CPU hour (measured: see docs/results/). Depths trimmed to 20 and 56.
  medium  x0.25  -> 16,000 iterations (steps at 8k, 12k), evaluated every 1,000.
  paper   x1     -> 64,000 iterations (steps at 32k, 48k), evaluated every 2,000: the paper's own budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import DataSpec, ModelSpec, RunConfig, Runtime
from .recipes import Recipe, get_recipe


@dataclass(frozen=True)
class Budget:
    name: str
    scale: float
    eval_every: int
    log_every: int
    description: str
    batch_size: int | None = None    # None: the recipe's (the paper's) batch


BUDGETS = {
    "quick": Budget("quick", 0.015, 320, 20, "x0.015 of the paper's schedule: 960 iterations, lr steps at 480/720"),
    "medium": Budget("medium", 0.25, 1000, 50, "x0.25: 16,000 iterations, lr steps at 8k/12k"),
    "paper": Budget("paper", 1.0, 2000, 100, "the paper's schedule: 64,000 iterations, lr steps at 32k/48k"),
    # a tiny variant of every experiment, for smoke tests: 32 iterations at batch 16
    "smoke": Budget("smoke", 0.0005, 16, 8, "smoke test: 32 iterations at batch 16", batch_size=16),
}


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str                       # what of the paper it reproduces
    data: str                        # "cifar10" | "folder"
    recipe: str
    # budget name -> the nets (a budget may trim the list): an arch name, or (label, arch, model options)
    archs: dict[str, tuple]
    default_seeds: dict[str, int] = field(default_factory=lambda: {"quick": 1, "medium": 1, "paper": 1})
    variants: tuple[tuple[str, tuple], ...] = ()   # (label suffix, model options) per arch; () = one plain run
    needs: str = ""                  # what the experiment needs that a default setup lacks
    post: str = ""                   # an analysis of the trained runs: "layer_responses"
    analysis: str = ""               # what the report computes

    def recipe_for(self, budget: str) -> Recipe:
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; valid choices: {', '.join(BUDGETS)}")
        b = BUDGETS[budget]
        return get_recipe(self.recipe).scaled(b.scale).with_overrides(eval_every=b.eval_every, log_every=b.log_every,
                                                                      batch_size=b.batch_size)

    def configs(self, budget: str, root, data_dir=None, seeds: int | None = None) -> list[RunConfig]:
        """The experiment's runs at `budget`, each in ROOT/BUDGET/LABEL-sSEED."""
        r = self.recipe_for(budget)
        n = seeds or self.default_seeds.get(budget, 1)
        # a budget without its own list uses the paper's; the smoke budget uses the quick list (smallest)
        archs = self.archs.get(budget) or (self.archs.get("quick") if budget == "smoke" else None) or self.archs["paper"]
        data = DataSpec(self.data, None if data_dir is None else str(data_dir))
        out = []
        for seed in range(n):
            for entry in archs:
                label, a, base = (entry, entry, ()) if isinstance(entry, str) else entry
                for suffix, options in (self.variants or (("", ()),)):
                    run_dir = Path(root) / budget / f"{label}{suffix}-s{seed}"
                    model = ModelSpec.make(a, **dict(base), **dict(options))
                    out.append(RunConfig(str(run_dir), model, r, data, Runtime(), seed))
        return out


EXPERIMENTS = {
    "cifar-degradation": Experiment(
        "cifar-degradation", "Fig. 1 / Fig. 6: training and test error of plain and residual nets", "cifar10",
        "cifar-paper",
        {"quick": ("plain20", "plain56", "resnet56", "resnet20"),
         "paper": ("plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44", "resnet56",
                   "resnet110")},
        analysis="curves of training (dashed) and test (bold) error against iterations; final errors"),
    "cifar-table6": Experiment(
        "cifar-table6", "Table 6: CIFAR-10 test error of ResNet-20/32/44/56/110", "cifar10", "cifar-paper",
        {"quick": ("resnet20", "resnet56"), "paper": ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
        default_seeds={"quick": 2, "medium": 3, "paper": 5},
        analysis="test error mean ± std over seeds and best-of-N, next to the paper and other reproductions"),
    "layer-responses": Experiment(
        "layer-responses", "Fig. 7: std of each 3x3 layer's response (after BN, before addition/ReLU)", "cifar10",
        "cifar-paper", {"quick": ("plain20", "plain56", "resnet20", "resnet56"),
                        "paper": ("plain20", "plain56", "resnet20", "resnet56", "resnet110")},
        post="layer_responses", analysis="per-layer response std in layer order and sorted, from the trained checkpoints"),
    "shortcut-options": Experiment(
        "shortcut-options", "Table 3's question: shortcut options A vs B vs C", "cifar10", "cifar-paper",
        {"quick": ("resnet20",), "paper": ("resnet56",)},
        variants=(("-A", (("shortcut", "A"),)), ("-B", (("shortcut", "B"),)), ("-C", (("shortcut", "C"),))),
        analysis="test error per option"),
    "gross-wilber": Experiment(
        "gross-wilber", "Gross & Wilber's block variants: no ReLU after the addition, BN after it, pre-activation",
        "cifar10", "cifar-paper", {"quick": ("resnet56",), "paper": ("resnet110",)},
        variants=(("-paper", ()), ("-norelu", (("relu_after_add", False),)), ("-bnadd", (("bn_after_add", True),)),
                  ("-preact", (("preact", True),))),
        analysis="test error per variant next to Gross & Wilber's ResNet-110 numbers (docs/paper.md)"),
    "width-vs-depth": Experiment(
        "width-vs-depth", "Readers' question: can width replace depth? CIFAR nets of matched parameter counts",
        "cifar10", "cifar-paper",
        # widths chosen so every net has the parameters of the deepest one within 2% (counted with `reslab info`)
        {"quick": ("resnet56", ("resnet20-w1.78", "resnet20", (("width", 1.78),)),
                   ("resnet32-w1.35", "resnet32", (("width", 1.35),))),
         "paper": ("resnet110", ("resnet56-w1.42", "resnet56", (("width", 1.42),)),
                   ("resnet32-w1.93", "resnet32", (("width", 1.93),)),
                   ("resnet20-w2.55", "resnet20", (("width", 2.55),)),
                   ("resnet14-w3.2", "resnet14", (("width", 3.2),)))},
        analysis="test error against parameters and against MACs, one point per net"),
    "block-design": Experiment(
        "block-design", "Readers' questions: layers per block (1, 2, 3) at equal depth, and a gated (highway) shortcut",
        "cifar10", "cifar-paper",
        # equal depth: 1-layer blocks need twice the blocks of the paper's 2-layer ones, 3-layer blocks 2/3 of them
        {"quick": ("resnet20", ("blocks1-d20", "resnet38", (("block_layers", 1),)),
                   ("blocks3-d20", "resnet14", (("block_layers", 3),)),
                   ("gated20", "resnet20", (("shortcut", "gated"),))),
         "paper": ("resnet56", ("blocks1-d56", "resnet110", (("block_layers", 1),)),
                   ("blocks3-d56", "resnet38", (("block_layers", 3),)),
                   ("gated56", "resnet56", (("shortcut", "gated"),)))},
        analysis="test error per block design at equal depth; params and MACs of each"),
    "imagenet-degradation": Experiment(
        "imagenet-degradation", "Fig. 4 / Table 2: plain-18/34 vs ResNet-18/34 on ImageNet", "folder",
        # Table 2's ResNets have option A shortcuts, "no extra parameter compared to the plain counterparts"
        # (§4.1); the zoo's ImageNet default is option B, the paper's choice for ResNet-50/101/152
        "imagenet-paper", {"paper": ("plain18", "plain34", ("resnet18", "resnet18", (("shortcut", "A"),)),
                                     ("resnet34", "resnet34", (("shortcut", "A"),)))},
        needs="an ImageNet-style folder (train/<class>/*.JPEG, val/<class>/*.JPEG) passed as --data-dir",
        analysis="training and validation error curves; 10-crop top-1 with `reslab eval --views 10crop`"),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid choices: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
