"""Pretrain a base GPT. Everything is sized from --depth unless a flag says otherwise.

    python -m scripts.base_train --depth 12                      # one GPU or CPU
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20  # one node, 8 GPUs
    python -m scripts.base_train --depth 12 --resume latest      # continue the last checkpoint

See docs/multinode.md for several nodes. The loop itself lives in nanochat/train_loop.py.
Output: <base dir>/base_checkpoints/<model tag>/ (run.json, metrics.jsonl, model/meta/optim files per step).
Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving a checkpoint), 2 bad flags / missing
tokenizer, data or checkpoint, 3 non-finite loss (last good checkpoint kept), 4 CUDA out of memory,
5 training finished and saved but an evaluation failed (its error is printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/base_train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import sizing  # noqa: E402
from nanochat.attention import ATTENTION_CHOICES  # noqa: E402
from nanochat.checkpoint_manager import CheckpointError  # noqa: E402
from nanochat.config import ConfigError, TrainConfig  # noqa: E402
from nanochat.dataset import DataError  # noqa: E402
from nanochat.tokenizer import TokenizerError  # noqa: E402
from nanochat.train_loop import EXIT_CONFIG, train  # noqa: E402
from scripts.flags import resume_step  # noqa: E402


def device_batch_size(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sequences or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a base model", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="number of transformer layers (the one dial)")
    g.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x aspect ratio, rounded up to --head-dim")
    g.add_argument("--head-dim", type=int, default=128)
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--n-kv-head", type=int, default=None, help="kv heads for GQA (default: = heads)")
    g.add_argument("--window-pattern", type=str, default=None,
                   help="sliding-window pattern, e.g. SSSL (default: SSSL on CUDA with a windowed attention kernel, "
                        "the record recipe with --value-embeds --resid-scalars; L elsewhere)")
    g.add_argument("--value-embeds", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with the record recipe (see --window-pattern)")
    g.add_argument("--resid-scalars", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with the record recipe (see --window-pattern)")
    g.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention kernel (auto on CUDA: FA3 > FA4 > FlexAttention (its FA4 backend, then Triton) "
                        "for windowed models, SDPA for full causal; SDPA on CPU)")
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=device_batch_size, default=32,
                   help="sequences per micro-batch per device, or 'auto': the largest that fits (a short probe; "
                        "gradient accumulation keeps --total-batch-size)")
    g.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: auto from horizon)")
    g.add_argument("--target-param-data-ratio", type=float, default=sizing.COMPUTE_OPTIMAL_RATIO,
                   help="training tokens per scaling parameter (used when neither steps nor FLOPs are given)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from FLOPs or ratio)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--matrix-lr", type=float, default=sizing.BASE_LRS["matrix_lr"],
                   help="Muon LR at 2^19 tokens per step")
    g.add_argument("--embedding-lr", type=float, default=sizing.BASE_LRS["embedding_lr"],
                   help="AdamW LR at 2^19 tokens, width 768")
    g.add_argument("--unembedding-lr", type=float, default=sizing.BASE_LRS["unembedding_lr"])
    g.add_argument("--scalar-lr", type=float, default=sizing.BASE_LRS["scalar_lr"])
    g.add_argument("--weight-decay", type=float, default=-1.0, help="Muon weight decay (-1: auto from batch, horizon)")
    g.add_argument("--warmup-steps", type=int, default=40)
    g.add_argument("--warmdown-ratio", type=float, default=0.65)
    g.add_argument("--final-lr-frac", type=float, default=0.05)
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1: only at the end, 0: never)")
    g.add_argument("--eval-tokens", type=int, default=-1,
                   help="validation tokens per evaluation (-1: 10 x 2^19 on CUDA, a tenth of the training tokens "
                        "elsewhere, at most 10 x 2^19)")
    g.add_argument("--core-metric-every", type=int, default=2000, help="-1: only at the end, 0: never")
    g.add_argument("--core-metric-max-per-task", type=int, default=500)
    g.add_argument("--sample-every", type=int, default=2000, help="-1: only at the end, 0: never")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    g.add_argument("--keep-last", type=int, default=-1, help="keep only the newest N checkpoints (-1: all)")
    g.add_argument("--final-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="save a checkpoint at the last step (--no-final-checkpoint: benchmarks, which only need "
                        "the metrics; a stop signal still saves)")
    g.add_argument("--resume-from-step", "--resume", dest="resume_from_step", type=resume_step, default=None,
                   help="a checkpoint step of this model tag, 'latest', or 'auto' (latest if this tag has "
                        "a checkpoint, else start fresh: one command line for first launch and requeues)")
    g.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy': no wandb)")
    g.add_argument("--model-tag", type=str, default=None, help="run folder name (default d<depth>)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device-type", type=str, default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    g.add_argument("--dtype", type=str, default=None, help="auto | float32 | bfloat16 | float16 (auto: bf16 on SM80+ GPUs and on CPUs where a GEMM probe finds it faster)")
    g.add_argument("--threads", type=str, default="auto",
                   help="CPU intra-op threads: auto (all cores, fewer while other processes use them) or a number")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    g.add_argument("--compile-scope", choices=["model", "blocks"], default="model",
                   help="what --compile compiles: the whole model (fuses across blocks), or each block on its "
                        "own (faster to compile; on several GPUs the gradient reductions of the last blocks "
                        "then overlap the rest of backward, worth it across nodes)")
    g.add_argument("--fused-loss", choices=["auto", "on", "off"], default="auto",
                   help="LM head + soft-cap + cross-entropy in row chunks without the full logits "
                        "(nanochat/lm_loss.py; same math). auto: on wherever the head runs eagerly (CPU, --no-compile, "
                        "--compile-scope blocks: the plain head's fp32 logits would need tens of GB at depth 20), "
                        "off inside a whole-model torch.compile, which fuses the plain path")
    g.add_argument("--grad-reduce-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the gradient reductions across ranks: bf16 halves the bytes sent (the sums "
                        "are rounded to bf16; the optimizer math stays fp32)")
    g.add_argument("--overlap-reductions", action=argparse.BooleanOptionalAction, default=True,
                   help="start each gradient reduction during the last backward, as soon as its gradients "
                        "are final (several ranks only)")
    g.add_argument("--fp8", action="store_true",
                   help="block Linears in fp8 (e4m3 forward, e5m2 gradients, tensorwise scales; sm89+ GPUs). "
                        "MFU stays against the bf16 peak")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--data-dir", type=str, default=None, help="prepared shards (default <base dir>/base_data)")
    g.add_argument("--keep-remainder", type=int, default=0, metavar="N",
                   help="training rows: put the cropped tail of a document (>= N tokens) back into the packing "
                        "buffer instead of discarding it (0: discard, the reference recipe). For rows short "
                        "against the documents, e.g. seq 256 on book chapters, where cropping wastes most text")
    g.add_argument("--data-streams", type=int, default=0, metavar="L",
                   help="cut the training data into L logical streams, each packed on its own; rank r of W packs "
                        "L/W of them and tokenises only their data. A checkpoint resumes on any world size that "
                        "divides L (docs/multinode.md). 0: the largest power of two up to 64 dividing the rows of "
                        "a step (on resume: the checkpoint's)")
    g.add_argument("--synthetic-data", action="store_true",
                   help="random tokens instead of the dataset (benchmarks; no tokenizer needed; evals off)")
    g.add_argument("--vocab-size", type=int, default=32768, help="vocab for --synthetic-data (else the tokenizer's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(TrainConfig.from_dict(vars(args)))
    except (ConfigError, CheckpointError, DataError, TokenizerError, FileNotFoundError) as e:
        # inconsistent flags, missing tokenizer / data / checkpoint: one line saying what to do, no traceback
        print(f"base_train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
