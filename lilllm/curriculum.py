"""The map of the course: which notebook teaches what, and which lilllm modules hold its
finished code. The setup notebook, the README table and the notebook tests read it."""

from dataclasses import dataclass

from lilllm.notebook import NOTEBOOKS_DIR


@dataclass(frozen=True)
class Chapter:
    notebook: str  # file stem in notebooks/
    adds: str  # what the chapter adds to the model or the pipeline
    modules: tuple[str, ...]  # the lilllm modules it teaches (imports and checks against)

    @property
    def path(self):
        return NOTEBOOKS_DIR / f"{self.notebook}.ipynb"

    @property
    def written(self) -> bool:
        return self.path.exists()


CURRICULUM = (
    Chapter("00_setup", "the map, the environment check, the data and its split",
            ("lilllm.env", "lilllm.data", "lilllm.notebook", "lilllm.curriculum", "lilllm.cli")),
    Chapter("01_tokenizer", "characters → bytes → byte-level BPE, served by tiktoken; token files",
            ("lilllm.tokenizer", "lilllm.data")),
    Chapter("02_rmsnorm", "LayerNorm → RMSNorm", ("lilllm.layers.norm",)),
    Chapter("03_rope", "absolute positions → rotary position embeddings", ("lilllm.layers.rope",)),
    Chapter("04_attention", "causal attention → MHA → MQA → GQA, SDPA, the KV cache",
            ("lilllm.layers.attention",)),
    Chapter("05_swiglu", "GELU MLP → SwiGLU; the decoder block and the whole model",
            ("lilllm.layers.ffn", "lilllm.config", "lilllm.model")),
    Chapter("06_plga", "Power Law Graph Attention (PLDR-LLM)", ("lilllm.layers.plga",)),
    Chapter("07_moe", "mixture-of-experts with three ways to balance the load", ("lilllm.layers.moe",)),
    Chapter("08_pretraining", "the training loop, checkpoints, bits per byte", ("lilllm.train",)),
    Chapter("09_sft", "chat template, assistant-only loss, fine-tuning", ("lilllm.sft",)),
    Chapter("10_sampling", "greedy, temperature, top-k, top-p, KV-cache generation", ("lilllm.sampling",)),
)
