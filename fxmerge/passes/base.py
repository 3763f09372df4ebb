"""The pass contract fxmerge's passes follow: torch.fx's `PassBase`, whose `ensures` checks
the graph the pass returns (fxmerge's passes never change the graph they are given)."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

# what the passes record in `GraphModule.meta`
PLAN_META = "fxmerge_plan"  # the plan a graph was pruned with (kept when it is merged)
MERGED_META = "fxmerge_merged"  # True once its blocks are merged
REPARAMETERIZED_META = "fxmerge_reparameterized"  # how many regions were collapsed


class FxMergePass(PassBase):
    """`requires(gm)` checks what the pass needs of its input, `call(gm)` returns a
    `PassResult` holding a new GraphModule, and `ensures(result)` checks what the pass
    promises of that result. Instances run in a torch.fx `PassManager`."""

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result
