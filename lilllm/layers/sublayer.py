"""What the model asks of every attention and feed-forward layer besides `forward`.

A decoder block holds two sublayers: an attention and a feed-forward network. Some of them
need more from training than a gradient: a mixture of experts adds a balance loss, reports
how evenly its experts were loaded, and moves its routing bias after each optimizer step;
PLGA adds DAG terms to the loss. Each such need is a method here that does nothing by
default. A layer overrides the ones it uses, and the model calls them on every sublayer
(`GPT.auxiliary_loss`, `GPT.layer_metrics`, `GPT.after_optimizer_step`). A parallel block
asks both of its sublayers for their `input_projections` to fuse them into one matmul.
"""

import torch
import torch.nn as nn


class Sublayer(nn.Module):
    def input_projections(self) -> list[nn.Linear]:
        """The linear layers that read the input, if the rest of the layer can run from their
        outputs alone; empty (the default) means "cannot be fused"."""
        return []

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Extra loss terms of the last training forward pass, already weighted, by name."""
        return {}

    def after_optimizer_step(self) -> None:
        """Update state the optimizer does not own; called once per optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging about the last optimizer step, by name."""
        return {}
